//! Quilt's default seccomp filter for containers.
//!
//! This module owns the syscall policy and its compilation into a classic-BPF
//! program. It does not install the filter: the container's init process does
//! that right before `execve`, after dropping capabilities and setting
//! `no_new_privs`, so the policy covers everything a program needs from
//! `execve` onwards (`execve` included). Build the program once, before
//! forking, with [`default_program`]; the child must not allocate.
//!
//! The model is moby's default profile (`profiles/seccomp/default.json`) for a
//! container without `CAP_SYS_ADMIN`: an allow-list, and every other syscall
//! fails with `EPERM`. Refused, and why:
//! - `mount`, `umount2`, `pivot_root`, `chroot`, `fsopen`, `fsconfig`, `fsmount`,
//!   `fspick`, `move_mount`, `open_tree`, `open_tree_attr`, `mount_setattr`:
//!   reshaping the mount tree uncovers masked `/proc` paths or leaves the rootfs;
//!   `fsconfig` was CVE-2022-0185's way out of a container.
//! - `unshare`, `setns`, and `clone` with a namespace flag: a new user namespace
//!   hands out "root" over fresh namespaces and the kernel code behind them
//!   (CVE-2022-0185, CVE-2022-0492's `release_agent` escape).
//! - `clone3` fails with `ENOSYS`, not `EPERM`: its flags sit in a struct that a
//!   filter cannot read, and `ENOSYS` is what makes glibc fall back to `clone`.
//! - `keyctl`, `add_key`, `request_key`: keyrings are not namespaced
//!   (CVE-2016-0728).
//! - `bpf`: the eBPF verifier is a steady source of privilege escalations
//!   (CVE-2017-16995, CVE-2021-3490).
//! - `perf_event_open`: kernel attack surface and side channels (CVE-2013-2094).
//! - `ptrace`, `process_vm_readv`, `process_vm_writev`, `kcmp`, `pidfd_getfd`,
//!   `process_madvise`: reaching into other processes (CVE-2019-13272).
//! - `kexec_load`, `kexec_file_load`, `init_module`, `finit_module`,
//!   `delete_module`: replacing or extending the host kernel.
//! - `open_by_handle_at`, `name_to_handle_at`: file handles bypass the mount
//!   namespace and read host files (the 2014 "Shocker" escape).
//! - `swapon`, `swapoff`, `reboot`, `acct`, `quotactl`, `quotactl_fd`,
//!   `sethostname`, `setdomainname`, `vhangup`, `fanotify_init`: host-wide
//!   administration.
//! - `settimeofday`, `clock_settime`, `adjtimex`, `clock_adjtime`: the clock is
//!   not namespaced.
//! - `syslog`: the kernel log leaks addresses that defeat KASLR.
//! - `userfaultfd`: stalls kernel copies mid-way to win exploit races.
//! - `io_uring_setup`, `io_uring_enter`, `io_uring_register`: a rich source of
//!   escapes (CVE-2021-41073, CVE-2023-2598).
//! - `mbind`, `set_mempolicy`, `get_mempolicy`, `set_mempolicy_home_node`,
//!   `migrate_pages`, `move_pages`: NUMA control needs `CAP_SYS_NICE`;
//!   `move_pages` leaked other processes' layout (CVE-2017-14140).
//! - `lookup_dcookie`, `cachestat` (page-cache side channel), `statmount`,
//!   `listmount`, `listns`, `lsm_*`: introspection ordinary programs do not need.
//! - x86_64 only: `iopl`, `ioperm` (raw port I/O), `modify_ldt` (CVE-2015-3290,
//!   CVE-2017-17053), `uselib` (CVE-2004-1235).
//!
//! Allowed only with argument checks:
//! - `clone` when no `CLONE_NEW*` flag is set (`fork`, `vfork` and threads pass);
//! - `personality` for `PER_LINUX`, `PER_LINUX32`, their `UNAME26` variants and
//!   the query `0xffffffff`, so ASLR and NX cannot be switched off
//!   (CVE-2009-1895);
//! - `socket` for every family except `AF_VSOCK`, which is not network
//!   namespaced and reaches the host past the container's network;
//! - `ioctl` except `TIOCSTI` and `TIOCLINUX`, which push input into a terminal
//!   the container may share with the host (CVE-2017-5226, CVE-2023-1523).
//!
//! Two refusals say `ENOSYS` so that libc falls back instead of failing:
//! `clone3`, and any syscall numbered above [`LAST_REVIEWED_SYSCALL`], which
//! this policy predates (runc does the same). Syscalls of another ABI (i386 on
//! x86_64, AArch32 on aarch64) kill the process. Architectures: x86_64 and
//! aarch64; the syscall numbers come from `libc`, plus the few newer ones that
//! `libc` does not name on every target. Written on `seccompiler`, with a
//! six-instruction hand-made prefix because `seccompiler` has one errno per
//! filter.

#![cfg_attr(not(test), deny(unsafe_code))]

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Errors from building the seccomp filter, named after the step that failed.
///
/// `pub` because the engine's public error carries it.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter is only written for x86_64 and aarch64.
    #[error("unsupported architecture for seccomp filter: {0}")]
    Arch(String),
    /// An argument condition or rule was rejected by `seccompiler`.
    #[error("building a seccomp argument rule")]
    Rule(#[source] BackendError),
    /// `seccompiler` rejected the filter or could not compile it to BPF.
    #[error("compiling the seccomp filter")]
    Compile(#[source] BackendError),
    /// The program is longer than the kernel accepts (`BPF_MAXINSNS`).
    #[error("seccomp program has {0} instructions, more than the kernel's limit")]
    TooLong(usize),
}

/// A syscall as `libc` names it (`SYS_read`) and its number on this architecture.
type Syscall = (&'static str, libc::c_long);

/// Builds a table of [`Syscall`]s from `SYS_*` names, so a name cannot drift
/// from its number.
macro_rules! syscalls {
    ($($sys:ident),* $(,)?) => {
        &[$((stringify!($sys), numbers::$sys)),*]
    };
}

/// Syscall numbers: everything `libc` names, plus newer syscalls from the
/// unified table (the same number on every architecture since Linux 5.1,
/// `include/uapi/asm-generic/unistd.h`) that `libc` 0.2 lacks on some targets.
#[allow(non_upper_case_globals)]
mod numbers {
    pub(super) use libc::*;

    pub(super) const SYS_cachestat: c_long = 451;
    pub(super) const SYS_fchmodat2: c_long = 452;
    pub(super) const SYS_map_shadow_stack: c_long = 453;
    pub(super) const SYS_futex_wake: c_long = 454;
    pub(super) const SYS_futex_wait: c_long = 455;
    pub(super) const SYS_futex_requeue: c_long = 456;
    pub(super) const SYS_statmount: c_long = 457;
    pub(super) const SYS_listmount: c_long = 458;
    pub(super) const SYS_lsm_get_self_attr: c_long = 459;
    pub(super) const SYS_lsm_set_self_attr: c_long = 460;
    pub(super) const SYS_lsm_list_modules: c_long = 461;
    pub(super) const SYS_setxattrat: c_long = 463;
    pub(super) const SYS_getxattrat: c_long = 464;
    pub(super) const SYS_listxattrat: c_long = 465;
    pub(super) const SYS_removexattrat: c_long = 466;
    pub(super) const SYS_open_tree_attr: c_long = 467;
    pub(super) const SYS_file_getattr: c_long = 468;
    pub(super) const SYS_file_setattr: c_long = 469;
    pub(super) const SYS_listns: c_long = 470;
}

/// The highest syscall number this policy was reviewed against (`listns`,
/// Linux 6.18). Anything above fails with `ENOSYS`, so that a newer libc in an
/// image takes its fallback path instead of failing on `EPERM`.
pub(crate) const LAST_REVIEWED_SYSCALL: u32 = 470;

/// Allowed unconditionally on every supported architecture.
const ALLOWED: &[Syscall] = syscalls![
    SYS_accept,
    SYS_accept4,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchmodat2,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_file_getattr,
    SYS_file_setattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_futex_requeue,
    SYS_futex_wait,
    SYS_futex_waitv,
    SYS_futex_wake,
    SYS_get_robust_list,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_getxattrat,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_io_setup,
    SYS_io_submit,
    SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_listxattrat,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_map_shadow_stack,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_memfd_secret,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_mseal,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_pselect6,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_removexattrat,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_setsid,
    SYS_setsockopt,
    SYS_setuid,
    SYS_setxattr,
    SYS_setxattrat,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// x86_64's legacy syscalls, which aarch64 never had (its libc uses the `*at`
/// forms and `clone`).
#[cfg(target_arch = "x86_64")]
const ALLOWED_ON_THIS_ARCH: &[Syscall] = syscalls![
    SYS_access,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_chmod,
    SYS_chown,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_wait,
    SYS_eventfd,
    SYS_fork,
    SYS_futimesat,
    SYS_get_thread_area,
    SYS_getdents,
    SYS_getpgrp,
    SYS_inotify_init,
    SYS_lchown,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_rmdir,
    SYS_select,
    SYS_set_thread_area,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_ON_THIS_ARCH: &[Syscall] = &[];

/// The refused syscalls the module doc explains. Every syscall that is on no
/// allow-list is refused too; this list is the reviewed part, for docs and tests.
const DENIED: &[Syscall] = syscalls![
    SYS_acct,
    SYS_add_key,
    SYS_adjtimex,
    SYS_bpf,
    SYS_cachestat,
    SYS_chroot,
    SYS_clock_adjtime,
    SYS_clock_settime,
    SYS_clone3,
    SYS_delete_module,
    SYS_fanotify_init,
    SYS_finit_module,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fsopen,
    SYS_fspick,
    SYS_get_mempolicy,
    SYS_init_module,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_io_uring_setup,
    SYS_kcmp,
    SYS_kexec_load,
    SYS_keyctl,
    SYS_listmount,
    SYS_listns,
    SYS_lookup_dcookie,
    SYS_lsm_get_self_attr,
    SYS_lsm_list_modules,
    SYS_lsm_set_self_attr,
    SYS_mbind,
    SYS_migrate_pages,
    SYS_mount,
    SYS_mount_setattr,
    SYS_move_mount,
    SYS_move_pages,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_open_tree,
    SYS_open_tree_attr,
    SYS_perf_event_open,
    SYS_pidfd_getfd,
    SYS_pivot_root,
    SYS_process_madvise,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_ptrace,
    SYS_quotactl,
    SYS_quotactl_fd,
    SYS_reboot,
    SYS_request_key,
    SYS_set_mempolicy,
    SYS_set_mempolicy_home_node,
    SYS_setdomainname,
    SYS_sethostname,
    SYS_setns,
    SYS_settimeofday,
    SYS_statmount,
    SYS_swapoff,
    SYS_swapon,
    SYS_syslog,
    SYS_umount2,
    SYS_unshare,
    SYS_userfaultfd,
    SYS_vhangup,
];

/// Refused syscalls that exist only on this architecture.
#[cfg(target_arch = "x86_64")]
const DENIED_ON_THIS_ARCH: &[Syscall] =
    syscalls![SYS_ioperm, SYS_iopl, SYS_kexec_file_load, SYS_modify_ldt, SYS_uselib];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ON_THIS_ARCH: &[Syscall] = &[];

/// A syscall allowed only when its arguments pass one of its rules.
struct ArgumentChecked {
    syscall: Syscall,
    /// Alternatives: the call is allowed when every condition of one rule holds.
    rules: fn() -> Result<Vec<SeccompRule>, SeccompError>,
}

/// The syscalls allowed only with argument checks, and their rules.
const ARGUMENT_CHECKED: &[ArgumentChecked] = &[
    ArgumentChecked { syscall: (stringify!(SYS_clone), numbers::SYS_clone), rules: clone_rules },
    ArgumentChecked {
        syscall: (stringify!(SYS_personality), numbers::SYS_personality),
        rules: personality_rules,
    },
    ArgumentChecked { syscall: (stringify!(SYS_socket), numbers::SYS_socket), rules: socket_rules },
    ArgumentChecked { syscall: (stringify!(SYS_ioctl), numbers::SYS_ioctl), rules: ioctl_rules },
];

/// The `clone` flags that create namespaces: moby's mask `0x7E020000`.
/// `CLONE_NEWTIME` is missing on purpose: legacy `clone` reads that bit as part
/// of the exit signal, so only `unshare` and `clone3` could use it.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// `personality(2)` values moby allows: `PER_LINUX`, `PER_LINUX32`, both with
/// `UNAME26`, and `0xffffffff`, which only queries the current persona.
const ALLOWED_PERSONALITIES: [u64; 5] = [0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// `AF_VSOCK` from `<linux/socket.h>`; `libc` names it only for glibc targets.
const AF_VSOCK: u64 = 40;

/// Terminal-injecting `ioctl` requests, `<asm-generic/ioctls.h>` (the same on
/// x86_64 and aarch64).
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;

/// `AUDIT_ARCH_*` from `<linux/audit.h>`: the ELF machine, 64-bit, little-endian.
const AUDIT_ARCH_64BIT_LE: u32 = 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_X86_64: u32 = libc::EM_X86_64 as u32 | AUDIT_ARCH_64BIT_LE;
const AUDIT_ARCH_AARCH64: u32 = libc::EM_AARCH64 as u32 | AUDIT_ARCH_64BIT_LE;

// The kernel reads the program through `libc::sock_filter`'s layout.
const _: () = assert!(
    std::mem::size_of::<sock_filter>() == std::mem::size_of::<libc::sock_filter>()
        && std::mem::align_of::<sock_filter>() == std::mem::align_of::<libc::sock_filter>()
);

/// Builds the default filter: the same program on every call for a given
/// architecture. Compile it once, before forking, and hand it to the child.
pub(crate) fn default_program() -> Result<BpfProgram, SeccompError> {
    let (target_arch, audit_arch) = target_arch()?;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().chain(ALLOWED_ON_THIS_ARCH).map(|&(_, number)| (number, Vec::new())).collect();
    for checked in ARGUMENT_CHECKED {
        rules.insert(checked.syscall.1, (checked.rules)()?);
    }

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(errno(libc::EPERM)),
        SeccompAction::Allow,
        target_arch,
    )
    .map_err(SeccompError::Compile)?;
    let compiled = BpfProgram::try_from(filter).map_err(SeccompError::Compile)?;

    let mut program = enosys_prefix(audit_arch).to_vec();
    program.extend(compiled);
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(program)
}

/// The `sock_fprog` that `seccomp(SECCOMP_SET_MODE_FILTER, ...)` takes. It
/// points into `program`, which must stay alive and unmoved until that call.
pub(crate) fn sock_fprog(program: &BpfProgram) -> Result<libc::sock_fprog, SeccompError> {
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&len| usize::from(len) <= BPF_MAXINSNS)
        .ok_or(SeccompError::TooLong(program.len()))?;
    Ok(libc::sock_fprog { len, filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut() })
}

/// Names of the syscalls the filter can allow (`read`, `clone`, ...), those
/// with argument checks included, for docs and tests.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn allowed_syscalls() -> impl Iterator<Item = &'static str> {
    ALLOWED
        .iter()
        .chain(ALLOWED_ON_THIS_ARCH)
        .chain(ARGUMENT_CHECKED.iter().map(|checked| &checked.syscall))
        .map(|&(name, _)| bare_name(name))
}

/// Names of the syscalls the module doc lists as refused, for docs and tests.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn denied_syscalls() -> impl Iterator<Item = &'static str> {
    DENIED.iter().chain(DENIED_ON_THIS_ARCH).map(|&(name, _)| bare_name(name))
}

/// The kernel's limit on a classic-BPF program, `BPF_MAXINSNS`.
const BPF_MAXINSNS: usize = libc::BPF_MAXINSNS as usize;

/// `read` for `libc`'s `SYS_read`.
fn bare_name(libc_name: &'static str) -> &'static str {
    libc_name.strip_prefix("SYS_").unwrap_or(libc_name)
}

/// This machine's architecture for `seccompiler`, and its `AUDIT_ARCH_*`.
fn target_arch() -> Result<(TargetArch, u32), SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok((TargetArch::x86_64, AUDIT_ARCH_X86_64)),
        "aarch64" => Ok((TargetArch::aarch64, AUDIT_ARCH_AARCH64)),
        other => Err(SeccompError::Arch(other.to_owned())),
    }
}

/// `SECCOMP_RET_ERRNO` data; errno values are small and positive.
const fn errno(value: libc::c_int) -> u32 {
    value.unsigned_abs()
}

/// Runs before `seccompiler`'s program, which has a single errno for every
/// refusal: answers `ENOSYS` for `clone3` and for syscalls newer than
/// [`LAST_REVIEWED_SYSCALL`], and falls through otherwise. Another ABI's
/// syscalls fall through to `seccompiler`'s own architecture check, which
/// kills the process.
fn enosys_prefix(audit_arch: u32) -> [sock_filter; 6] {
    const LOAD_WORD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const JUMP_IF_EQUAL: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    const JUMP_IF_GREATER: u32 = libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K;
    const RETURN: u32 = libc::BPF_RET | libc::BPF_K;
    const ARCH_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, arch) as u32;
    const NR_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, nr) as u32;
    let enosys = u32::from(SeccompAction::Errno(errno(libc::ENOSYS)));
    // Jumps count from the next instruction; index 6 is the first instruction
    // after the prefix.
    [
        /* 0 */ instruction(LOAD_WORD, ARCH_OFFSET, 0, 0),
        /* 1 */ instruction(JUMP_IF_EQUAL, audit_arch, 0, 4),
        /* 2 */ instruction(LOAD_WORD, NR_OFFSET, 0, 0),
        /* 3 */ instruction(JUMP_IF_EQUAL, syscall_number(numbers::SYS_clone3), 1, 0),
        /* 4 */ instruction(JUMP_IF_GREATER, LAST_REVIEWED_SYSCALL, 0, 1),
        /* 5 */ instruction(RETURN, enosys, 0, 0),
    ]
}

/// One classic-BPF instruction, as `BPF_STMT`/`BPF_JUMP` build it.
const fn instruction(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    // BPF opcodes fit in 16 bits.
    sock_filter { code: code as u16, jt, jf, k }
}

/// Syscall numbers are small and positive on every supported architecture.
const fn syscall_number(number: libc::c_long) -> u32 {
    number as u32
}

/// A condition on the lower 32 bits of a syscall argument.
fn dword_condition(
    argument: u8,
    operator: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    // Every argument checked here is a 32-bit `int` or `unsigned int` to the
    // kernel, which ignores the upper half; comparing 64 bits would let a caller
    // dodge a check by setting an ignored bit (CVE-2019-10063).
    SeccompCondition::new(argument, SeccompCmpArgLen::Dword, operator, value).map_err(SeccompError::Rule)
}

/// A rule that holds when all of `conditions` hold.
fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Rule)
}

/// `clone(flags, ...)` without namespace flags; `flags` is argument 0 on both
/// x86_64 and aarch64, and the kernel reads only its lower 32 bits.
fn clone_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![rule(vec![dword_condition(0, SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0)?])?])
}

/// `personality(persona)` for the values in [`ALLOWED_PERSONALITIES`].
fn personality_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    ALLOWED_PERSONALITIES
        .iter()
        .map(|&persona| rule(vec![dword_condition(0, SeccompCmpOp::Eq, persona)?]))
        .collect()
}

/// `socket(domain, ...)` for every domain but `AF_VSOCK`.
fn socket_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![rule(vec![dword_condition(0, SeccompCmpOp::Ne, AF_VSOCK)?])?])
}

/// `ioctl(fd, request, ...)` for every request but `TIOCSTI` and `TIOCLINUX`.
fn ioctl_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![rule(vec![
        dword_condition(1, SeccompCmpOp::Ne, TIOCSTI)?,
        dword_condition(1, SeccompCmpOp::Ne, TIOCLINUX)?,
    ])?])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    /// `AUDIT_ARCH_I386`: a foreign ABI on both supported architectures.
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    fn native_audit_arch() -> u32 {
        target_arch().expect("supported architecture").1
    }

    fn nr(number: libc::c_long) -> u32 {
        u32::try_from(number).expect("syscall numbers are positive")
    }

    /// Interprets the classic-BPF subset the program uses, as the kernel would
    /// for a syscall with this `struct seccomp_data`.
    fn evaluate(program: &[sock_filter], arch: u32, number: u32, args: [u64; 6]) -> u32 {
        const LOAD_WORD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
        const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
        const JUMP: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
        const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        const JUMP_IF_GREATER: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
        const JUMP_IF_GREATER_OR_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
        const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

        let mut data = [0u8; std::mem::size_of::<libc::seccomp_data>()];
        data[0..4].copy_from_slice(&number.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (index, arg) in args.iter().enumerate() {
            let offset = 16 + 8 * index;
            data[offset..offset + 8].copy_from_slice(&arg.to_le_bytes());
        }

        let mut accumulator = 0u32;
        let mut pc = 0usize;
        loop {
            let instruction = &program[pc];
            let k = instruction.k;
            pc += 1;
            let taken =
                |condition: bool| usize::from(if condition { instruction.jt } else { instruction.jf });
            match instruction.code {
                LOAD_WORD => {
                    let offset = k as usize;
                    let word: [u8; 4] = data[offset..offset + 4].try_into().unwrap();
                    accumulator = u32::from_le_bytes(word);
                }
                AND => accumulator &= k,
                JUMP => pc += k as usize,
                JUMP_IF_EQUAL => pc += taken(accumulator == k),
                JUMP_IF_GREATER => pc += taken(accumulator > k),
                JUMP_IF_GREATER_OR_EQUAL => pc += taken(accumulator >= k),
                RETURN => return k,
                other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    fn decide(program: &[sock_filter], number: libc::c_long, args: [u64; 6]) -> u32 {
        evaluate(program, native_audit_arch(), nr(number), args)
    }

    #[test]
    fn program_compiles_and_fits_the_kernel_limit() {
        let program = default_program().unwrap();
        assert!(program.len() > enosys_prefix(native_audit_arch()).len());
        assert!(program.len() <= BPF_MAXINSNS, "{} instructions", program.len());
        assert_eq!(program, default_program().unwrap(), "the build is deterministic");
        let fprog = sock_fprog(&program).unwrap();
        assert_eq!(usize::from(fprog.len), program.len());
    }

    #[test]
    fn lists_have_no_duplicates_and_do_not_overlap() {
        let allowed: Vec<Syscall> = ALLOWED
            .iter()
            .chain(ALLOWED_ON_THIS_ARCH)
            .copied()
            .chain(ARGUMENT_CHECKED.iter().map(|checked| checked.syscall))
            .collect();
        let denied: Vec<Syscall> = DENIED.iter().chain(DENIED_ON_THIS_ARCH).copied().collect();
        for list in [&allowed, &denied] {
            let names: HashSet<_> = list.iter().map(|entry| entry.0).collect();
            let numbers: HashSet<_> = list.iter().map(|entry| entry.1).collect();
            assert_eq!(names.len(), list.len(), "duplicate name");
            assert_eq!(numbers.len(), list.len(), "duplicate number");
        }
        for (name, number) in &denied {
            assert!(
                !allowed.iter().any(|entry| entry.0 == *name || entry.1 == *number),
                "{name} is both allowed and denied"
            );
        }
        assert_eq!(allowed_syscalls().count(), allowed.len());
        assert!(allowed_syscalls().all(|name| !name.starts_with("SYS_")));
    }

    #[test]
    fn every_syscall_the_security_rules_name_is_refused() {
        let must_block = [
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "clone3",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "open_by_handle_at",
            "name_to_handle_at",
            "swapon",
            "swapoff",
            "reboot",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "acct",
            "quotactl",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "clock_adjtime",
            "syslog",
            "lookup_dcookie",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
        ];
        let allowed: HashSet<_> = allowed_syscalls().collect();
        let denied: HashSet<_> = denied_syscalls().collect();
        for name in must_block {
            assert!(denied.contains(name), "{name} missing from the deny list");
            assert!(!allowed.contains(name), "{name} is allowed");
        }
        #[cfg(target_arch = "x86_64")]
        assert!(denied.contains("kexec_file_load") && denied.contains("modify_ldt"));
    }

    #[test]
    fn evaluated_program_matches_the_tables() {
        let program = default_program().unwrap();
        for &(name, number) in ALLOWED.iter().chain(ALLOWED_ON_THIS_ARCH) {
            assert_eq!(decide(&program, number, [0; 6]), ALLOW, "{name}");
        }
        for &(name, number) in DENIED.iter().chain(DENIED_ON_THIS_ARCH) {
            let expected = if number == libc::SYS_clone3 { ENOSYS } else { EPERM };
            assert_eq!(decide(&program, number, [0; 6]), expected, "{name}");
        }
        let listed: HashSet<u32> = ALLOWED
            .iter()
            .chain(ALLOWED_ON_THIS_ARCH)
            .map(|entry| nr(entry.1))
            .chain(ARGUMENT_CHECKED.iter().map(|checked| nr(checked.syscall.1)))
            .collect();
        for number in 0..=LAST_REVIEWED_SYSCALL {
            let expected = match number {
                _ if number == nr(libc::SYS_clone3) => ENOSYS,
                _ if listed.contains(&number) => continue,
                _ => EPERM,
            };
            let decision = evaluate(&program, native_audit_arch(), number, [0; 6]);
            assert_eq!(decision, expected, "syscall {number}");
        }
        // Newer than the review, x32 (bit 30 on x86_64) and negative numbers.
        for number in (LAST_REVIEWED_SYSCALL + 1..1024).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
            let decision = evaluate(&program, native_audit_arch(), number, [0; 6]);
            assert_eq!(decision, ENOSYS, "syscall {number:#x}");
        }
        for number in [libc::SYS_getpid, libc::SYS_read, libc::SYS_clone3, libc::SYS_mount] {
            assert_eq!(evaluate(&program, AUDIT_ARCH_I386, nr(number), [0; 6]), KILL_PROCESS);
        }
    }

    #[test]
    // libc's `Ioctl` is `c_ulong` on glibc but `c_int` on musl.
    #[allow(clippy::unnecessary_cast)]
    fn argument_checks_follow_the_policy() {
        let program = default_program().unwrap();
        let with_first = |number, arg: u64| decide(&program, number, [arg, 0, 0, 0, 0, 0]);
        let sigchld = libc::SIGCHLD as u64;

        assert_eq!(NAMESPACE_FLAGS, 0x7E02_0000, "moby's namespace mask");
        let thread_flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(with_first(libc::SYS_clone, sigchld), ALLOW, "fork");
        assert_eq!(with_first(libc::SYS_clone, thread_flags), ALLOW, "pthread_create");
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ] {
            let flags = flag as u64 | sigchld;
            assert_eq!(with_first(libc::SYS_clone, flags), EPERM, "clone {flags:#x}");
            assert_eq!(with_first(libc::SYS_clone, flags | 1 << 40), EPERM, "{flags:#x}");
        }

        for persona in ALLOWED_PERSONALITIES {
            assert_eq!(with_first(libc::SYS_personality, persona), ALLOW, "{persona:#x}");
        }
        let no_aslr = libc::ADDR_NO_RANDOMIZE as u64;
        let read_implies_exec = 0x0040_0000;
        for persona in [no_aslr, read_implies_exec, 0x0008 | no_aslr] {
            assert_eq!(with_first(libc::SYS_personality, persona), EPERM, "{persona:#x}");
        }

        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK] {
            assert_eq!(with_first(libc::SYS_socket, family as u64), ALLOW, "family {family}");
        }
        assert_eq!(with_first(libc::SYS_socket, AF_VSOCK), EPERM);
        assert_eq!(with_first(libc::SYS_socket, AF_VSOCK | 1 << 32), EPERM);

        let ioctl = |request: u64| decide(&program, libc::SYS_ioctl, [0, request, 0, 0, 0, 0]);
        assert_eq!(TIOCSTI, libc::TIOCSTI as u64);
        assert_eq!(TIOCLINUX, libc::TIOCLINUX as u64);
        assert_eq!(ioctl(libc::TCGETS as u64), ALLOW);
        assert_eq!(ioctl(libc::FIONREAD as u64), ALLOW);
        assert_eq!(ioctl(TIOCSTI), EPERM);
        assert_eq!(ioctl(TIOCSTI | 1 << 32), EPERM, "CVE-2019-10063's upper-bits bypass");
        assert_eq!(ioctl(TIOCLINUX), EPERM);
    }

    /// Waits for `pid`, retrying on `EINTR`, and returns its raw wait status.
    /// Safe to call in a forked child: no allocation, no panic.
    fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid, writable c_int for the call.
            let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
            if waited == pid {
                return Some(status);
            }
            if last_errno() != libc::EINTR {
                return None;
            }
        }
    }

    fn exit_code(status: libc::c_int) -> Option<libc::c_int> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }

    fn last_errno() -> libc::c_int {
        // Reads errno without allocating, so it is usable after fork.
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// A raw syscall; pointers travel as integers.
    fn raw(number: libc::c_long, args: [libc::c_long; 5]) -> libc::c_long {
        let [a, b, c, d, e] = args;
        // SAFETY: the tests pass integers, null, or pointers to live
        // NUL-terminated strings that the kernel only reads.
        unsafe { libc::syscall(number, a, b, c, d, e) }
    }

    fn fails_with(result: libc::c_long, errno: libc::c_int) -> bool {
        result == -1 && last_errno() == errno
    }

    /// Forks, runs `body` in the child and exits with its return value. The
    /// child only makes raw syscalls: the test harness is multi-threaded.
    fn in_child(body: impl FnOnce() -> libc::c_int) -> libc::c_int {
        // SAFETY: the child runs only async-signal-safe calls on data prepared
        // before the fork and leaves through `_exit`, never returning here.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                let code = body();
                // SAFETY: ends the forked child without running the harness's
                // destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            pid => reap_within(pid, CHILD_DEADLINE),
        }
    }

    /// Long enough for a loaded machine; a child that outlives it is stuck,
    /// for example a thread-exit that the filter refused.
    const CHILD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

    /// Waits for `pid` in the parent; kills it and fails the test once
    /// `deadline` has passed, so a stuck filtered process cannot hang the suite.
    fn reap_within(pid: libc::pid_t, deadline: std::time::Duration) -> libc::c_int {
        let start = std::time::Instant::now();
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid, writable c_int for the call.
            match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
                0 if start.elapsed() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                0 => {
                    // SAFETY: `pid` is our own unreaped child, so the id
                    // cannot have been reused.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    reap(pid);
                    panic!("child {pid} still running after {deadline:?}; killed it");
                }
                waited if waited == pid => return status,
                _ if last_errno() == libc::EINTR => {}
                _ => panic!("waitpid: {}", std::io::Error::last_os_error()),
            }
        }
    }

    /// In the child: sets `no_new_privs` and installs the filter the way the
    /// engine does.
    fn install(fprog: &libc::sock_fprog) -> bool {
        let no_new_privs = libc::PR_SET_NO_NEW_PRIVS.into();
        let no_new_privs = raw(libc::SYS_prctl, [no_new_privs, 1, 0, 0, 0]) == 0;
        let set_mode_filter = libc::SECCOMP_SET_MODE_FILTER.into();
        let fprog = std::ptr::from_ref(fprog) as libc::c_long;
        no_new_privs && raw(libc::SYS_seccomp, [set_mode_filter, 0, fprog, 0, 0]) == 0
    }

    /// Every check the filtered child makes, in order; its exit code is the
    /// 1-based index of the first one that failed.
    const CHILD_CHECKS: &[&str] = &[
        "control: mount() without the filter fails with ENOENT (is the test already under seccomp?)",
        "prctl(PR_SET_NO_NEW_PRIVS) and seccomp(SECCOMP_SET_MODE_FILTER)",
        "getpid() works",
        "unshare(CLONE_NEWUSER) fails with EPERM",
        "mount() fails with EPERM",
        "clone3() fails with ENOSYS",
        "keyctl() fails with EPERM",
        "clone(CLONE_NEWUSER | SIGCHLD) fails with EPERM",
        "io_uring_setup() fails with EPERM",
        "socket(AF_VSOCK) fails with EPERM",
        "ioctl(TIOCSTI) fails with EPERM",
        "personality(ADDR_NO_RANDOMIZE) fails with EPERM",
        "personality(0xffffffff) works",
        "socket(AF_UNIX) works",
        "clone(SIGCHLD) forks a child that exits 42",
        "execve(/bin/true) in a grandchild exits 0",
    ];

    fn failed_check(status: libc::c_int) -> String {
        match exit_code(status) {
            Some(0) => "none".to_owned(),
            Some(code) => usize::try_from(code - 1)
                .ok()
                .and_then(|index| CHILD_CHECKS.get(index))
                .map_or_else(|| format!("unknown exit code {code}"), |check| check.to_string()),
            None => format!("child did not exit normally, wait status {status:#x}"),
        }
    }

    #[test]
    fn filtered_process_is_confined_but_can_fork_and_exec() {
        let program = default_program().unwrap();
        let fprog = sock_fprog(&program).unwrap();
        let true_path = c"/bin/true";
        let argv = [true_path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // The kernel looks the target up before checking privileges, so
        // without the filter this fails with ENOENT for root and non-root.
        let mount_target = c"/nonexistent/quilt-seccomp-test".as_ptr() as libc::c_long;
        let mount = [0, mount_target, 0, 0, 0];

        let status = in_child(|| {
            let mut step = 0;
            macro_rules! check {
                ($passed:expr) => {
                    step += 1;
                    if !$passed {
                        return step;
                    }
                };
            }
            check!(fails_with(raw(libc::SYS_mount, mount), libc::ENOENT));
            check!(install(&fprog));
            check!(raw(libc::SYS_getpid, [0; 5]) > 0);
            let new_user = libc::CLONE_NEWUSER.into();
            check!(fails_with(raw(libc::SYS_unshare, [new_user, 0, 0, 0, 0]), libc::EPERM));
            check!(fails_with(raw(libc::SYS_mount, mount), libc::EPERM));
            // Without the filter: EINVAL for a null struct of size 0.
            check!(fails_with(raw(libc::SYS_clone3, [0; 5]), libc::ENOSYS));
            // KEYCTL_GET_KEYRING_ID (0) of KEY_SPEC_SESSION_KEYRING (-3).
            check!(fails_with(raw(libc::SYS_keyctl, [0, -3, 0, 0, 0]), libc::EPERM));
            let clone_new_user =
                raw(libc::SYS_clone, [new_user | libc::c_long::from(libc::SIGCHLD), 0, 0, 0, 0]);
            match clone_new_user {
                // The filter let it through and this is the new process: leave.
                // SAFETY: ends the accidental grandchild at once.
                0 => unsafe { libc::_exit(0) },
                pid if pid > 0 => {
                    reap(pid as libc::pid_t);
                }
                _ => {}
            }
            check!(fails_with(clone_new_user, libc::EPERM));
            check!(fails_with(raw(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0]), libc::EPERM));
            let vsock = [AF_VSOCK as libc::c_long, libc::SOCK_STREAM.into(), 0, 0, 0];
            check!(fails_with(raw(libc::SYS_socket, vsock), libc::EPERM));
            check!(fails_with(raw(libc::SYS_ioctl, [-1, TIOCSTI as libc::c_long, 0, 0, 0]), libc::EPERM));
            let no_aslr = libc::ADDR_NO_RANDOMIZE.into();
            check!(fails_with(raw(libc::SYS_personality, [no_aslr, 0, 0, 0, 0]), libc::EPERM));
            check!(raw(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0]) >= 0);
            let unix = [libc::AF_UNIX.into(), libc::SOCK_STREAM.into(), 0, 0, 0];
            let fd = raw(libc::SYS_socket, unix);
            check!(fd >= 0 && raw(libc::SYS_close, [fd, 0, 0, 0, 0]) == 0);
            let forked = raw(libc::SYS_clone, [libc::SIGCHLD.into(), 0, 0, 0, 0]);
            if forked == 0 {
                // SAFETY: ends the forked grandchild with a known code.
                unsafe { libc::_exit(42) }
            }
            check!(forked > 0 && reap(forked as libc::pid_t).and_then(exit_code) == Some(42));
            // SAFETY: fork from the child, which is single-threaded.
            let exec_child = unsafe { libc::fork() };
            if exec_child == 0 {
                // SAFETY: argv and envp are null-terminated arrays of pointers
                // to live C strings.
                unsafe { libc::execve(true_path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                // SAFETY: execve failed; end the grandchild.
                unsafe { libc::_exit(126) }
            }
            check!(exec_child > 0 && reap(exec_child).and_then(exit_code) == Some(0));
            // A check added without its description would mislabel failures.
            if usize::try_from(step).ok() == Some(CHILD_CHECKS.len()) {
                0
            } else {
                100
            }
        });
        assert_eq!(exit_code(status), Some(0), "failed check: {}", failed_check(status));
    }

    /// Set in the environment of [`filtered_process_helper`] when
    /// [`ordinary_program_runs_under_the_filter`] runs it under the filter.
    const HELPER_ENV: &str = "QUILT_SECCOMP_HELPER";
    /// The helper's exit code when every step worked; libtest itself exits 0
    /// or 101, so this proves the helper ran to the end.
    const HELPER_SUCCESS: i32 = 77;

    #[test]
    fn ordinary_program_runs_under_the_filter() {
        let program = default_program().unwrap();
        let fprog = sock_fprog(&program).unwrap();
        // libtest names tests by their path without the crate name.
        let module = module_path!().split_once("::").unwrap().1;
        let test_name = format!("{module}::filtered_process_helper");
        let executable = CString::new(std::env::current_exe().unwrap().as_os_str().as_bytes()).unwrap();
        let args: Vec<CString> = ["--exact", &test_name, "--ignored", "--quiet", "--test-threads=1"]
            .iter()
            .map(|arg| CString::new(*arg).unwrap())
            .collect();
        let mut argv: Vec<*const libc::c_char> = vec![executable.as_ptr()];
        argv.extend(args.iter().map(|arg| arg.as_ptr()));
        argv.push(std::ptr::null());
        let helper_env = CString::new(format!("{HELPER_ENV}=1")).unwrap();
        let envp = [helper_env.as_ptr(), std::ptr::null()];

        let status = in_child(|| {
            if !install(&fprog) {
                return 1;
            }
            // SAFETY: argv and envp are null-terminated arrays of pointers to
            // C strings that outlive the call.
            unsafe { libc::execve(executable.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            2
        });
        assert_eq!(
            exit_code(status),
            Some(HELPER_SUCCESS),
            "helper under the filter failed, wait status {status:#x}"
        );
    }

    /// Runs as an ordinary Rust program under the filter: threads (glibc tries
    /// clone3, gets ENOSYS, falls back to clone), files, sockets, subprocesses
    /// and a shell pipeline.
    #[test]
    #[ignore = "run under the filter by ordinary_program_runs_under_the_filter"]
    fn filtered_process_helper() {
        if std::env::var_os(HELPER_ENV).is_none() {
            return;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|line| line == "Seccomp:\t2"), "filter not in force");

        let worker = std::thread::spawn(|| 6 * 7);
        assert_eq!(worker.join().unwrap(), 42);

        let dir = std::env::temp_dir().join(format!("quilt-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("file"), b"contents").unwrap();
        assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"contents");
        std::fs::remove_dir_all(&dir).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || std::net::TcpStream::connect(address).is_ok());
        let (_stream, _) = listener.accept().unwrap();
        assert!(client.join().unwrap());

        let child = std::process::Command::new("/bin/true").status().unwrap();
        assert!(child.success());

        // What a task's script does: a shell, pipelines, subshells, coreutils.
        let script = "set -e; grep -q '^Seccomp:[[:space:]]*2' /proc/self/status; \
            ls / | sort | head -n 1 >/dev/null; (cd / && pwd) >/dev/null; \
            now=$(date +%s); test \"$now\" -gt 0";
        let shell = std::process::Command::new("/bin/sh").args(["-c", script]).status().unwrap();
        assert!(shell.success(), "{script}: {shell}");

        // SAFETY: unshare with an integer flag.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        assert_eq!((unshared, last_errno()), (-1, libc::EPERM));

        std::process::exit(HELPER_SUCCESS);
    }
}
