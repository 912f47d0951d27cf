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
//! this policy predates (runc does the same); x32 syscalls on x86_64 get
//! `ENOSYS` too. Syscalls of another ABI (i386 on x86_64, AArch32 on aarch64)
//! kill the process. Architectures: x86_64 and aarch64; the syscall numbers
//! come from `libc`, plus the few newer ones that `libc` does not name on every
//! target.
//!
//! ## Why the program is generated here and not by `seccompiler`
//!
//! `seccompiler` compiles a policy into one linear chain of compares: 1522
//! instructions for this policy on x86_64, of which an allowed syscall could
//! run 605. Installing that program was the largest single step of a container
//! start, a median 584 µs per `seccomp(2)` (Linux 6.18, x86_64, release build,
//! 201 forked children): the kernel checks, translates and JIT-compiles every
//! instruction, and since Linux 5.11 also runs the filter once per syscall
//! number to find the syscalls it may allow without running it
//! (`seccomp_cache_prepare`), so install time grows with length times depth.
//!
//! [`generate`] emits an architecture check, an x32 check, then a balanced
//! binary search over the syscall numbers grouped into ranges with one action
//! each, whose leaves jump to four shared returns or to a short argument check:
//! 99 instructions, at most 12 run for an allowed syscall (17 with an argument
//! check), a median 34 µs to install against 8.5 µs for a lone `return ALLOW`.
//! Always-allowed syscalls cost the same under both programs because the kernel
//! skips the filter for them; an argument-checked `personality` call went from
//! 215 to 112 ns (95 ns under the lone return). A conditional jump reaches only 255
//! instructions ahead, so a target out of reach gets a stand-in next to the
//! jump (a copy of the return, or an unconditional jump with a 32-bit offset);
//! the generator fails rather than emit a jump it cannot encode.
//!
//! `seccompiler` stays as the test oracle: the tests rebuild the old program
//! with it and check that both decide alike for every syscall number up to
//! 1023, x32 and foreign ABIs, and argument values on and around every rule.
//! The figures above come from the ignored test
//! `measure_seccompiler_and_generated_programs`. seccompiler is a
//! dev-dependency only: the oracle of the equivalence test.

#![cfg_attr(not(test), deny(unsafe_code))]

use std::collections::BTreeMap;

use libc::sock_filter;

/// A classic-BPF program as seccomp(2) takes it.
pub(crate) type BpfProgram = Vec<sock_filter>;

/// Errors from building the seccomp filter, named after the step that failed.
///
/// `pub` because the engine's public error carries it.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter is only written for x86_64 and aarch64.
    #[error("unsupported architecture for seccomp filter: {0}")]
    Arch(String),
    /// A jump needs a longer offset than its instruction can encode; the
    /// generator stops instead of emitting a program that jumps elsewhere.
    #[error("seccomp program needs a jump of {0} instructions, more than its encoding holds")]
    JumpOutOfRange(usize),
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

/// A syscall allowed only when its arguments pass its rule.
struct ArgumentChecked {
    syscall: Syscall,
    rule: ArgumentRule,
}

/// The syscalls allowed only with argument checks, and their rules. `clone`'s
/// flags, `personality`'s persona and `socket`'s domain are argument 0 and
/// `ioctl`'s request is argument 1, on x86_64 and aarch64 alike.
const ARGUMENT_CHECKED: &[ArgumentChecked] = &[
    ArgumentChecked {
        syscall: (stringify!(SYS_clone), numbers::SYS_clone),
        rule: ArgumentRule { argument: Argument::new(0), allows: Allows::NoBitOf(NAMESPACE_FLAGS) },
    },
    ArgumentChecked {
        syscall: (stringify!(SYS_personality), numbers::SYS_personality),
        rule: ArgumentRule { argument: Argument::new(0), allows: Allows::OneOf(&ALLOWED_PERSONALITIES) },
    },
    ArgumentChecked {
        syscall: (stringify!(SYS_socket), numbers::SYS_socket),
        rule: ArgumentRule { argument: Argument::new(0), allows: Allows::AllBut(&[AF_VSOCK]) },
    },
    ArgumentChecked {
        syscall: (stringify!(SYS_ioctl), numbers::SYS_ioctl),
        rule: ArgumentRule { argument: Argument::new(1), allows: Allows::AllBut(&[TIOCSTI, TIOCLINUX]) },
    },
];

/// A condition on the lower 32 bits of one syscall argument. Every argument
/// checked here is a 32-bit `int` or `unsigned int` to the kernel, which
/// ignores the upper half; comparing 64 bits would let a caller dodge a check
/// by setting an ignored bit (CVE-2019-10063).
#[derive(Debug, PartialEq, Eq)]
struct ArgumentRule {
    argument: Argument,
    allows: Allows,
}

/// The values of an argument that a rule lets through.
#[derive(Debug, PartialEq, Eq)]
enum Allows {
    /// Values with none of these bits set.
    NoBitOf(u32),
    /// Exactly these values.
    OneOf(&'static [u32]),
    /// Every value but these.
    AllBut(&'static [u32]),
}

/// A syscall argument's position, 0 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Argument(u32);

impl Argument {
    /// Fails to compile, in the constant tables, for a position a syscall
    /// does not have.
    const fn new(position: u32) -> Argument {
        assert!(position < 6, "a syscall has six arguments");
        Argument(position)
    }

    /// Where the argument's lower 32 bits sit in `struct seccomp_data`.
    const fn low_word_offset(self) -> u32 {
        let start = ARGS_OFFSET + 8 * self.0;
        if cfg!(target_endian = "little") {
            start
        } else {
            start + 4
        }
    }
}

/// The `clone` flags that create namespaces: moby's mask `0x7E020000`.
/// `CLONE_NEWTIME` is missing on purpose: legacy `clone` reads that bit as part
/// of the exit signal, so only `unshare` and `clone3` could use it.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// `personality(2)` values moby allows: `PER_LINUX`, `PER_LINUX32`, both with
/// `UNAME26`, and `0xffffffff`, which only queries the current persona.
const ALLOWED_PERSONALITIES: [u32; 5] = [0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// `AF_VSOCK` from `<linux/socket.h>`; `libc` names it only for glibc targets.
const AF_VSOCK: u32 = 40;

/// Terminal-injecting `ioctl` requests, `<asm-generic/ioctls.h>` (the same on
/// x86_64 and aarch64).
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;

/// `AUDIT_ARCH_*` from `<linux/audit.h>`: the ELF machine, 64-bit, little-endian.
const AUDIT_ARCH_64BIT_LE: u32 = 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_X86_64: u32 = libc::EM_X86_64 as u32 | AUDIT_ARCH_64BIT_LE;
const AUDIT_ARCH_AARCH64: u32 = libc::EM_AARCH64 as u32 | AUDIT_ARCH_64BIT_LE;

/// `__X32_SYSCALL_BIT` (`arch/x86/include/uapi/asm/unistd.h`): x32 syscalls
/// arrive as `AUDIT_ARCH_X86_64` with this bit set in the number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Offsets in `struct seccomp_data`, which the program reads.
const NR_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, nr) as u32;
const ARCH_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, arch) as u32;
const ARGS_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, args) as u32;

/// The classic-BPF instructions the program uses (`<linux/bpf_common.h>`).
const LOAD_WORD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JUMP: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JUMP_IF_GREATER_OR_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JUMP_IF_ANY_BIT: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Builds the default filter: the same program on every call for a given
/// architecture. Compile it once, before forking, and hand it to the child.
pub(crate) fn default_program() -> Result<BpfProgram, SeccompError> {
    let abi = native_abi()?;
    let x32 = abi.has_x32.then_some(Verdict::FailWithEnosys);
    generate(abi.audit_arch, x32, &policy_ranges())
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

/// The syscall ABI the filter is written for.
struct Abi {
    /// Its `AUDIT_ARCH_*`, which the kernel passes in `seccomp_data.arch`.
    audit_arch: u32,
    /// Whether x32 syscalls share that `AUDIT_ARCH_*` (x86_64 only).
    has_x32: bool,
}

/// This machine's syscall ABI.
fn native_abi() -> Result<Abi, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Abi { audit_arch: AUDIT_ARCH_X86_64, has_x32: true }),
        "aarch64" => Ok(Abi { audit_arch: AUDIT_ARCH_AARCH64, has_x32: false }),
        other => Err(SeccompError::Arch(other.to_owned())),
    }
}

/// `SECCOMP_RET_ERRNO` data; errno values are small and positive.
const fn errno(value: libc::c_int) -> u32 {
    value.unsigned_abs()
}

/// Syscall numbers are small and positive on every supported architecture.
const fn syscall_number(number: libc::c_long) -> u32 {
    number as u32
}

/// What the filter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Refused by the policy.
    FailWithEperm,
    /// Refused as a syscall the kernel lacks, so that libc falls back.
    FailWithEnosys,
    /// A syscall of another ABI.
    KillProcess,
}

impl Verdict {
    /// The value the program returns to the kernel.
    const fn return_value(self) -> u32 {
        match self {
            Verdict::Allow => libc::SECCOMP_RET_ALLOW,
            Verdict::FailWithEperm => libc::SECCOMP_RET_ERRNO | errno(libc::EPERM),
            Verdict::FailWithEnosys => libc::SECCOMP_RET_ERRNO | errno(libc::ENOSYS),
            Verdict::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// What the filter does with a syscall number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Return(Verdict),
    /// Allow when the arguments pass the rule, fail with `EPERM` otherwise.
    CheckArguments(&'static ArgumentRule),
}

/// Every syscall number, `0..=u32::MAX`, split into ranges of consecutive
/// numbers with one action. Only [`NumberRanges::new`] builds it, so the
/// ranges are in order, leave no gap and differ from their neighbours.
#[derive(Debug)]
struct NumberRanges {
    /// The action from 0 up to the first of `higher`.
    lowest: Action,
    /// Each later range: its first number and its action.
    higher: Vec<(u32, Action)>,
}

impl NumberRanges {
    /// `actions` yields the action of 0, 1, 2, ... in turn; every number after
    /// those gets `beyond`.
    fn new(actions: impl IntoIterator<Item = Action>, beyond: Action) -> NumberRanges {
        let mut ranges = NumberRanges { lowest: beyond, higher: Vec::new() };
        let mut after_last = 0;
        // Up to u32::MAX - 1, so that `beyond` always has a number left.
        for (number, action) in (0..u32::MAX).zip(actions) {
            if number == 0 {
                ranges.lowest = action;
            } else if ranges.last_action() != action {
                ranges.higher.push((number, action));
            }
            after_last = number + 1;
        }
        if ranges.last_action() != beyond {
            ranges.higher.push((after_last, beyond));
        }
        ranges
    }

    fn last_action(&self) -> Action {
        self.higher.last().map_or(self.lowest, |&(_, action)| action)
    }

    /// How many ranges there are.
    #[cfg(test)]
    fn len(&self) -> usize {
        1 + self.higher.len()
    }
}

/// The policy of the module doc as ranges of syscall numbers.
fn policy_ranges() -> NumberRanges {
    let allow = Action::Return(Verdict::Allow);
    let mut actions: BTreeMap<u32, Action> = ALLOWED
        .iter()
        .chain(ALLOWED_ON_THIS_ARCH)
        .map(|&(_, number)| (syscall_number(number), allow))
        .collect();
    for checked in ARGUMENT_CHECKED {
        actions.insert(syscall_number(checked.syscall.1), Action::CheckArguments(&checked.rule));
    }
    let not_implemented = Action::Return(Verdict::FailWithEnosys);
    actions.insert(syscall_number(numbers::SYS_clone3), not_implemented);
    let refuse = Action::Return(Verdict::FailWithEperm);
    let reviewed = (0..=LAST_REVIEWED_SYSCALL).map(|number| actions.get(&number).copied().unwrap_or(refuse));
    NumberRanges::new(reviewed, not_implemented)
}

/// Compiles `ranges` into a program for the ABI `audit_arch`: syscalls of any
/// other ABI kill the process, and on x86_64 (`x32` is `Some`) x32 syscalls
/// get that verdict.
///
/// Layout: load and check the architecture, load the number, the x32 check,
/// a balanced binary search over `ranges`, one argument check per
/// argument-checked range, and one return per verdict. Only the number and the
/// architecture are read until the search reaches an argument check, so the
/// kernel can tell at install time which syscalls are always allowed and skip
/// the filter for them (Linux 5.11, `seccomp_cache_prepare`).
fn generate(
    audit_arch: u32,
    x32: Option<Verdict>,
    ranges: &NumberRanges,
) -> Result<BpfProgram, SeccompError> {
    let mut assembler = Assembler::default();
    let returns = Returns::emit(&mut assembler);
    let mut target = |action: Action| match action {
        Action::Return(verdict) => Ok(returns.of(verdict)),
        Action::CheckArguments(rule) => {
            emit_argument_check(&mut assembler, rule, returns.allow, returns.refuse)
        }
    };
    let lowest = target(ranges.lowest)?;
    let higher = ranges
        .higher
        .iter()
        .map(|&(first, action)| Ok((first, target(action)?)))
        .collect::<Result<Vec<_>, SeccompError>>()?;

    let search = emit_search(&mut assembler, lowest, &higher)?;
    let after_number = match x32 {
        Some(verdict) => {
            assembler.branch(JUMP_IF_GREATER_OR_EQUAL, X32_SYSCALL_BIT, returns.of(verdict), search)?
        }
        None => search,
    };
    let load_number = assembler.load(NR_OFFSET, after_number)?;
    let arch_check = assembler.branch(JUMP_IF_EQUAL, audit_arch, load_number, returns.kill_process)?;
    assembler.load(ARCH_OFFSET, arch_check)?;
    assembler.finish()
}

/// One return instruction per verdict, at the end of the program, shared by
/// every jump that can reach it.
#[derive(Clone, Copy)]
struct Returns {
    allow: Label,
    refuse: Label,
    not_implemented: Label,
    kill_process: Label,
}

impl Returns {
    fn emit(assembler: &mut Assembler) -> Returns {
        Returns {
            allow: assembler.return_verdict(Verdict::Allow),
            refuse: assembler.return_verdict(Verdict::FailWithEperm),
            not_implemented: assembler.return_verdict(Verdict::FailWithEnosys),
            kill_process: assembler.return_verdict(Verdict::KillProcess),
        }
    }

    fn of(self, verdict: Verdict) -> Label {
        match verdict {
            Verdict::Allow => self.allow,
            Verdict::FailWithEperm => self.refuse,
            Verdict::FailWithEnosys => self.not_implemented,
            Verdict::KillProcess => self.kill_process,
        }
    }
}

/// Emits a balanced binary search that sends a syscall number to `lowest`
/// below the first number of `higher`, and to the target of the last range of
/// `higher` that starts at or below it otherwise. Returns its first
/// instruction: with `higher` empty, `lowest` itself.
fn emit_search(
    assembler: &mut Assembler,
    lowest: Label,
    higher: &[(u32, Label)],
) -> Result<Label, SeccompError> {
    let (below, rest) = higher.split_at(higher.len() / 2);
    let Some((&(boundary, from_boundary), above)) = rest.split_first() else {
        return Ok(lowest);
    };
    let at_or_above = emit_search(assembler, from_boundary, above)?;
    let under = emit_search(assembler, lowest, below)?;
    assembler.branch(JUMP_IF_GREATER_OR_EQUAL, boundary, at_or_above, under)
}

/// Emits the check of `rule`, which continues to `allow` or `refuse`.
fn emit_argument_check(
    assembler: &mut Assembler,
    rule: &ArgumentRule,
    allow: Label,
    refuse: Label,
) -> Result<Label, SeccompError> {
    let first_test = match rule.allows {
        Allows::NoBitOf(mask) => assembler.branch(JUMP_IF_ANY_BIT, mask, refuse, allow)?,
        Allows::OneOf(values) => emit_value_tests(assembler, values, allow, refuse)?,
        Allows::AllBut(values) => emit_value_tests(assembler, values, refuse, allow)?,
    };
    assembler.load(rule.argument.low_word_offset(), first_test)
}

/// Emits a test of the loaded word against each of `values` in turn, going to
/// `on_match` at the first equal one and to `otherwise` after the last.
fn emit_value_tests(
    assembler: &mut Assembler,
    values: &[u32],
    on_match: Label,
    otherwise: Label,
) -> Result<Label, SeccompError> {
    values
        .iter()
        .rev()
        .try_fold(otherwise, |next, &value| assembler.branch(JUMP_IF_EQUAL, value, on_match, next))
}

/// An instruction's place, counted from the end of the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Label(usize);

/// Emits a classic-BPF program backwards, last instruction first. cBPF jumps
/// only forwards, so every target is already placed when its jump is emitted
/// and the offset is known at once; a target beyond a conditional jump's 8-bit
/// reach gets a stand-in right after the jump: a copy of the target when it is
/// a return, an unconditional jump (32-bit offset) to it otherwise. Later
/// jumps to the same target reuse the stand-in while it is within reach.
#[derive(Default)]
struct Assembler {
    reversed: Vec<sock_filter>,
    /// The latest stand-in for each target that needed one.
    stand_ins: BTreeMap<Label, Label>,
}

impl Assembler {
    fn emit(&mut self, instruction: sock_filter) -> Label {
        self.reversed.push(instruction);
        Label(self.reversed.len() - 1)
    }

    /// The offset from an instruction emitted now to `target`. Offsets count
    /// from the next instruction, which is the one emitted last.
    fn offset_to(&self, target: Label) -> usize {
        self.reversed.len() - 1 - target.0
    }

    fn return_verdict(&mut self, verdict: Verdict) -> Label {
        self.emit(instruction(RETURN, verdict.return_value(), 0, 0))
    }

    /// Loads the word at `offset` of `struct seccomp_data`, then goes on at `next`.
    fn load(&mut self, offset: u32, next: Label) -> Result<Label, SeccompError> {
        if self.offset_to(next) != 0 {
            self.jump(next)?;
        }
        Ok(self.emit(instruction(LOAD_WORD, offset, 0, 0)))
    }

    fn jump(&mut self, target: Label) -> Result<Label, SeccompError> {
        let offset = self.offset_to(target);
        let offset_k = u32::try_from(offset).map_err(|_| SeccompError::JumpOutOfRange(offset))?;
        Ok(self.emit(instruction(JUMP, offset_k, 0, 0)))
    }

    /// Emits the conditional jump `code` with constant `k`.
    fn branch(&mut self, code: u16, k: u32, on_true: Label, on_false: Label) -> Result<Label, SeccompError> {
        // A stand-in emitted for `on_true` moves `on_false` one step further.
        let on_false = self.within_reach(on_false, 1)?;
        let on_true = self.within_reach(on_true, 0)?;
        let jump_if_true = self.short_offset(on_true)?;
        let jump_if_false = self.short_offset(on_false)?;
        Ok(self.emit(instruction(code, k, jump_if_true, jump_if_false)))
    }

    /// `target`, or a stand-in for it, that a conditional jump emitted after
    /// `more` further instructions can reach.
    fn within_reach(&mut self, target: Label, more: usize) -> Result<Label, SeccompError> {
        let reachable =
            |assembler: &Assembler, label: Label| assembler.offset_to(label) + more <= usize::from(u8::MAX);
        if reachable(self, target) {
            return Ok(target);
        }
        if let Some(&stand_in) = self.stand_ins.get(&target) {
            if reachable(self, stand_in) {
                return Ok(stand_in);
            }
        }
        let stand_in = match self.reversed.get(target.0) {
            Some(placed) if placed.code == RETURN => {
                let copy = *placed;
                self.emit(copy)
            }
            _ => self.jump(target)?,
        };
        self.stand_ins.insert(target, stand_in);
        Ok(stand_in)
    }

    fn short_offset(&self, target: Label) -> Result<u8, SeccompError> {
        let offset = self.offset_to(target);
        u8::try_from(offset).map_err(|_| SeccompError::JumpOutOfRange(offset))
    }

    /// The program, first instruction first: the one emitted last is the entry.
    fn finish(self) -> Result<BpfProgram, SeccompError> {
        let mut program = self.reversed;
        program.reverse();
        if program.len() > BPF_MAXINSNS {
            return Err(SeccompError::TooLong(program.len()));
        }
        Ok(program)
    }
}

/// One classic-BPF instruction, as `BPF_STMT`/`BPF_JUMP` build it.
const fn instruction(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    /// `AUDIT_ARCH_I386`: a foreign ABI on both supported architectures.
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    /// Opcodes that only the `seccompiler` program uses.
    const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const JUMP_IF_GREATER: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;

    fn native_audit_arch() -> u32 {
        native_abi().expect("supported architecture").audit_arch
    }

    /// The other supported architecture: a foreign 64-bit ABI.
    fn other_audit_arch() -> u32 {
        if native_audit_arch() == AUDIT_ARCH_X86_64 {
            AUDIT_ARCH_AARCH64
        } else {
            AUDIT_ARCH_X86_64
        }
    }

    fn nr(number: libc::c_long) -> u32 {
        u32::try_from(number).expect("syscall numbers are positive")
    }

    type SeccompData = [u8; std::mem::size_of::<libc::seccomp_data>()];

    /// `struct seccomp_data` as the kernel lays it out for a syscall.
    fn seccomp_data(arch: u32, number: u32, args: [u64; 6]) -> SeccompData {
        let mut data = [0; std::mem::size_of::<libc::seccomp_data>()];
        let mut put = |offset: u32, bytes: &[u8]| {
            let offset = offset as usize;
            data[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(NR_OFFSET, &number.to_ne_bytes());
        put(ARCH_OFFSET, &arch.to_ne_bytes());
        for (position, arg) in (0..).zip(args) {
            put(ARGS_OFFSET + 8 * position, &arg.to_ne_bytes());
        }
        data
    }

    /// What running a program on one `struct seccomp_data` did.
    #[derive(Debug, Clone, Copy)]
    struct Run {
        verdict: u32,
        /// Instructions executed, the return included.
        executed: usize,
        /// Whether it loaded anything but the number and the architecture: if
        /// not, the kernel proves the verdict at install time and skips the
        /// filter for that syscall (`seccomp_is_const_allow`).
        read_beyond_number: bool,
    }

    /// Interprets the classic-BPF subset both programs use, as the kernel would.
    fn run(program: &[sock_filter], data: &SeccompData) -> Run {
        let mut accumulator = 0u32;
        let mut pc = 0usize;
        let mut executed = 0;
        let mut read_beyond_number = false;
        loop {
            let instruction = &program[pc];
            let k = instruction.k;
            executed += 1;
            pc += 1;
            let taken =
                |condition: bool| usize::from(if condition { instruction.jt } else { instruction.jf });
            match instruction.code {
                LOAD_WORD => {
                    read_beyond_number |= k != NR_OFFSET && k != ARCH_OFFSET;
                    let offset = k as usize;
                    accumulator = u32::from_ne_bytes(data[offset..offset + 4].try_into().unwrap());
                }
                AND => accumulator &= k,
                JUMP => pc += k as usize,
                JUMP_IF_EQUAL => pc += taken(accumulator == k),
                JUMP_IF_GREATER => pc += taken(accumulator > k),
                JUMP_IF_GREATER_OR_EQUAL => pc += taken(accumulator >= k),
                JUMP_IF_ANY_BIT => pc += taken(accumulator & k != 0),
                RETURN => return Run { verdict: k, executed, read_beyond_number },
                other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    fn evaluate(program: &[sock_filter], arch: u32, number: u32, args: [u64; 6]) -> u32 {
        run(program, &seccomp_data(arch, number, args)).verdict
    }

    fn decide(program: &[sock_filter], number: libc::c_long, args: [u64; 6]) -> u32 {
        evaluate(program, native_audit_arch(), nr(number), args)
    }

    /// The checks the kernel makes before it accepts a filter
    /// (`bpf_check_classic`, `seccomp_check_filter`), for the instructions the
    /// generator emits.
    fn assert_kernel_accepts(program: &[sock_filter]) {
        assert!(!program.is_empty() && program.len() <= BPF_MAXINSNS, "{} instructions", program.len());
        for (pc, instruction) in program.iter().enumerate() {
            let after = program.len() - pc - 1;
            let k = instruction.k;
            match instruction.code {
                LOAD_WORD => {
                    let in_bounds = (k as usize) < std::mem::size_of::<libc::seccomp_data>();
                    assert!(k % 4 == 0 && in_bounds, "load of offset {k} at {pc}");
                }
                JUMP => assert!((k as usize) < after, "jump past the end at {pc}"),
                JUMP_IF_EQUAL | JUMP_IF_GREATER_OR_EQUAL | JUMP_IF_ANY_BIT => assert!(
                    usize::from(instruction.jt) < after && usize::from(instruction.jf) < after,
                    "jump past the end at {pc}"
                ),
                RETURN => {}
                other => panic!("opcode {other:#x} at {pc}"),
            }
        }
        assert_eq!(program.last().map(|last| last.code), Some(RETURN), "the last instruction must return");
    }

    /// What the policy's `rule` decides for `args`, straight from its meaning.
    fn rule_allows(rule: &ArgumentRule, args: [u64; 6]) -> bool {
        // The lower 32 bits, as the rules are defined.
        let value = args[rule.argument.0 as usize] as u32;
        match rule.allows {
            Allows::NoBitOf(mask) => value & mask == 0,
            Allows::OneOf(values) => values.contains(&value),
            Allows::AllBut(values) => !values.contains(&value),
        }
    }

    fn namespace_flags() -> [u64; 7] {
        [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
        ]
        .map(|flag| flag as u64)
    }

    /// What `pthread_create` passes to `clone`.
    fn thread_flags() -> u64 {
        (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64
    }

    /// Argument values on and around every rule of the policy.
    // libc's `Ioctl` is `c_ulong` on glibc but `c_int` on musl.
    #[allow(clippy::unnecessary_cast)]
    fn interesting_values() -> BTreeSet<u64> {
        let sigchld = libc::SIGCHLD as u64;
        let upper_half = 0xffff_ffff_0000_0000;
        let namespaces = u64::from(NAMESPACE_FLAGS);
        // Each bit alone: every namespace flag, its neighbours, the upper half.
        let mut values: BTreeSet<u64> = (0..64).map(|bit| 1 << bit).collect();
        values.extend([0, 0x7fff_ffff, u64::from(u32::MAX), u64::MAX, upper_half, sigchld, thread_flags()]);
        values.extend([namespaces, namespaces | upper_half, !namespaces, !namespaces & 0xffff_ffff]);
        values.extend([libc::CLONE_NEWTIME as u64 | sigchld, thread_flags() | namespaces]);
        for flag in namespace_flags() {
            values.extend([flag | sigchld, flag | thread_flags(), flag | 1 << 32]);
        }
        let exact = ALLOWED_PERSONALITIES.iter().chain(&[AF_VSOCK, TIOCSTI, TIOCLINUX]);
        for &value in exact {
            let value = u64::from(value);
            values.extend([value.wrapping_sub(1), value, value + 1, value | 1 << 32, value | upper_half]);
            values.extend([value ^ 0x8000_0000, value + 0x100]);
        }
        let no_aslr = libc::ADDR_NO_RANDOMIZE as u64;
        values.extend([no_aslr, 0x0040_0000, 0x0008 | no_aslr, 0x0002_0000 | no_aslr]);
        let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK, libc::AF_PACKET];
        values.extend(families.map(|family| family as u64));
        values.extend([libc::TCGETS as u64, libc::FIONREAD as u64, libc::TIOCGWINSZ as u64]);
        values
    }

    /// Each interesting value in every argument, and alone in argument 0 and
    /// in argument 1 (the ones the rules read).
    fn argument_vectors() -> Vec<[u64; 6]> {
        let mut vectors = BTreeSet::new();
        for value in interesting_values() {
            vectors.insert([value; 6]);
            vectors.insert([value, 0, 0, 0, 0, 0]);
            vectors.insert([0, value, 0, 0, 0, 0]);
            vectors.insert([value, u64::MAX, 0, 0, 0, 0]);
            vectors.insert([u64::MAX, value, 0, 0, 0, 0]);
        }
        vectors.into_iter().collect()
    }

    #[test]
    fn program_is_small_and_passes_the_kernel_checks() {
        let program = default_program().unwrap();
        assert!(program.len() < 400, "{} instructions", program.len());
        assert_kernel_accepts(&program);
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
        for number in 0..=1023 {
            let expected = match number {
                _ if number > LAST_REVIEWED_SYSCALL => ENOSYS,
                _ if number == nr(libc::SYS_clone3) => ENOSYS,
                _ if listed.contains(&number) => continue,
                _ => EPERM,
            };
            let decision = evaluate(&program, native_audit_arch(), number, [0; 6]);
            assert_eq!(decision, expected, "syscall {number}");
        }
        // x32 (bit 30 on x86_64, merely new numbers on aarch64) and negative numbers.
        let x32 = (0..1024).map(|number| X32_SYSCALL_BIT | number);
        for number in x32.chain([0x7fff_ffff, 0x8000_0000, u32::MAX]) {
            let decision = evaluate(&program, native_audit_arch(), number, [0; 6]);
            assert_eq!(decision, ENOSYS, "syscall {number:#x}");
        }
        for arch in [AUDIT_ARCH_I386, other_audit_arch(), 0] {
            for number in 0..1024 {
                assert_eq!(evaluate(&program, arch, number, [0; 6]), KILL_PROCESS, "{arch:#x} {number}");
            }
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
        assert_eq!(with_first(libc::SYS_clone, sigchld), ALLOW, "fork");
        assert_eq!(with_first(libc::SYS_clone, thread_flags()), ALLOW, "pthread_create");
        for flag in namespace_flags() {
            let flags = flag | sigchld;
            assert_eq!(with_first(libc::SYS_clone, flags), EPERM, "clone {flags:#x}");
            assert_eq!(with_first(libc::SYS_clone, flags | 1 << 40), EPERM, "{flags:#x}");
        }
        assert_eq!(
            with_first(libc::SYS_clone, sigchld | 1 << 40),
            ALLOW,
            "the kernel ignores the upper half"
        );

        for persona in ALLOWED_PERSONALITIES.map(u64::from) {
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
        let vsock = u64::from(AF_VSOCK);
        assert_eq!(with_first(libc::SYS_socket, vsock), EPERM);
        assert_eq!(with_first(libc::SYS_socket, vsock | 1 << 32), EPERM);

        let ioctl = |request: u64| decide(&program, libc::SYS_ioctl, [0, request, 0, 0, 0, 0]);
        let (tiocsti, tioclinux) = (u64::from(TIOCSTI), u64::from(TIOCLINUX));
        assert_eq!(tiocsti, libc::TIOCSTI as u64);
        assert_eq!(tioclinux, libc::TIOCLINUX as u64);
        assert_eq!(ioctl(libc::TCGETS as u64), ALLOW);
        assert_eq!(ioctl(libc::FIONREAD as u64), ALLOW);
        assert_eq!(ioctl(tiocsti), EPERM);
        assert_eq!(ioctl(tiocsti | 1 << 32), EPERM, "CVE-2019-10063's upper-bits bypass");
        assert_eq!(ioctl(tioclinux), EPERM);
        assert_eq!(
            decide(&program, libc::SYS_ioctl, [tiocsti, 0, 0, 0, 0, 0]),
            ALLOW,
            "request is argument 1"
        );
    }

    #[test]
    fn decides_every_case_like_the_seccompiler_program() {
        let oracle = seccompiler_oracle::program();
        let program = default_program().unwrap();
        let checked: BTreeSet<u32> = ARGUMENT_CHECKED.iter().map(|checked| nr(checked.syscall.1)).collect();
        let oracle_checked: BTreeSet<u32> = seccompiler_oracle::ARGUMENT_CHECKED.map(nr).into();
        assert_eq!(checked, oracle_checked, "the oracle must check the same syscalls' arguments");

        let native = native_audit_arch();
        // The native ABI without its 64-bit flag stands for a 32-bit one.
        let arches =
            [native, AUDIT_ARCH_I386, other_audit_arch(), native & !AUDIT_ARCH_64BIT_LE, 0, u32::MAX];
        let numbers: Vec<u32> = (0..1024)
            .chain((0..1024).map(|number| X32_SYSCALL_BIT | number))
            .chain([0x7fff_ffff, 0x8000_0000, u32::MAX])
            .collect();
        let vectors = argument_vectors();
        let mut checked_verdicts: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for arch in arches {
            for &number in &numbers {
                for &args in &vectors {
                    let data = seccomp_data(arch, number, args);
                    let expected = run(&oracle, &data).verdict;
                    assert_eq!(
                        run(&program, &data).verdict,
                        expected,
                        "arch {arch:#x}, syscall {number}, arguments {args:#x?}"
                    );
                    if arch == native && checked.contains(&number) {
                        checked_verdicts.entry(number).or_default().insert(expected);
                    }
                }
            }
        }
        // Every argument check was seen both passing and failing.
        for number in checked {
            assert_eq!(
                checked_verdicts.get(&number),
                Some(&BTreeSet::from([ALLOW, EPERM])),
                "syscall {number}"
            );
        }
    }

    #[test]
    fn search_is_balanced_and_reads_arguments_only_for_checked_syscalls() {
        let program = default_program().unwrap();
        let ranges_depth = policy_ranges().len().next_power_of_two().trailing_zeros() as usize;
        let prologue = if native_abi().unwrap().has_x32 { 4 } else { 3 };
        let longest_check = ARGUMENT_CHECKED
            .iter()
            .map(|checked| match checked.rule.allows {
                Allows::NoBitOf(_) => 2,
                Allows::OneOf(values) | Allows::AllBut(values) => 1 + values.len(),
            })
            .max()
            .unwrap();
        let checked: HashSet<u32> = ARGUMENT_CHECKED.iter().map(|checked| nr(checked.syscall.1)).collect();
        for number in 0..1024 {
            for args in [[0; 6], [u64::MAX; 6]] {
                let run = run(&program, &seccomp_data(native_audit_arch(), number, args));
                let (reads, most) = if checked.contains(&number) {
                    // A jump stand-in may sit between the search and the check.
                    (true, prologue + ranges_depth + 1 + longest_check + 1)
                } else {
                    (false, prologue + ranges_depth + 1)
                };
                assert_eq!(run.read_beyond_number, reads, "syscall {number}");
                assert!(run.executed <= most, "syscall {number}: {} instructions", run.executed);
            }
        }
    }

    #[test]
    fn ranges_merge_neighbours_and_cover_every_number() {
        let allow = Action::Return(Verdict::Allow);
        let refuse = Action::Return(Verdict::FailWithEperm);
        let ranges = NumberRanges::new([allow, allow, refuse, refuse, allow], allow);
        assert_eq!((ranges.lowest, ranges.higher), (allow, vec![(2, refuse), (4, allow)]));
        let ranges = NumberRanges::new([refuse], allow);
        assert_eq!((ranges.lowest, ranges.higher), (refuse, vec![(1, allow)]));
        let ranges = NumberRanges::new([], refuse);
        assert_eq!((ranges.lowest, ranges.higher), (refuse, vec![]));
    }

    /// Builds `load nr; branch(JUMP_IF_EQUAL 7, on_true, on_false)` with both
    /// targets at distances around a conditional jump's 255-instruction reach,
    /// either of them the farther, each a return or an instruction that is not.
    #[test]
    fn branches_reach_targets_at_every_distance() {
        let gaps = [0, 1, 100, 250, 251, 252, 253, 254, 255, 256, 257, 258, 300, 600];
        let emit_target = |assembler: &mut Assembler, verdict: Verdict, is_return: bool| {
            let returned = assembler.return_verdict(verdict);
            if is_return {
                returned
            } else {
                assembler.load(NR_OFFSET, returned).unwrap()
            }
        };
        // Unreachable instructions that put distance between the targets.
        let emit_gap = |assembler: &mut Assembler, length: usize| {
            for _ in 0..length {
                assembler.return_verdict(Verdict::KillProcess);
            }
        };
        let kinds = [(true, true), (true, false), (false, true), (false, false)];
        for true_is_farther in [true, false] {
            let (farther_verdict, nearer_verdict) = if true_is_farther {
                (Verdict::Allow, Verdict::FailWithEperm)
            } else {
                (Verdict::FailWithEperm, Verdict::Allow)
            };
            for (farther_is_return, nearer_is_return) in kinds {
                for (farther_gap, nearer_gap) in gaps.iter().flat_map(|&a| gaps.map(|b| (a, b))) {
                    let mut assembler = Assembler::default();
                    let farther = emit_target(&mut assembler, farther_verdict, farther_is_return);
                    emit_gap(&mut assembler, farther_gap);
                    let nearer = emit_target(&mut assembler, nearer_verdict, nearer_is_return);
                    emit_gap(&mut assembler, nearer_gap);
                    let (on_true, on_false) =
                        if true_is_farther { (farther, nearer) } else { (nearer, farther) };
                    let branch = assembler.branch(JUMP_IF_EQUAL, 7, on_true, on_false).unwrap();
                    assembler.load(NR_OFFSET, branch).unwrap();
                    let program = assembler.finish().unwrap();
                    assert_kernel_accepts(&program);
                    let case = format!(
                        "gaps {farther_gap} and {nearer_gap}, true is farther: {true_is_farther}, \
                         returns: {farther_is_return} and {nearer_is_return}"
                    );
                    assert_eq!(evaluate(&program, 0, 7, [0; 6]), ALLOW, "{case}");
                    assert_eq!(evaluate(&program, 0, 8, [0; 6]), EPERM, "{case}");
                }
            }
        }
    }

    /// A policy whose search alone is far longer than a conditional jump's
    /// reach: every number from 0 to 1499 differs from its neighbours, and
    /// every seventh is argument-checked.
    #[test]
    fn a_policy_beyond_short_jumps_compiles_to_its_decisions() {
        let rules: Vec<&'static ArgumentRule> =
            ARGUMENT_CHECKED.iter().map(|checked| &checked.rule).collect();
        let action_of = |number: u32| match number % 7 {
            0 => Action::CheckArguments(rules[(number as usize / 7) % rules.len()]),
            1 | 3 | 5 => Action::Return(Verdict::Allow),
            2 | 4 => Action::Return(Verdict::FailWithEperm),
            _ => Action::Return(Verdict::FailWithEnosys),
        };
        let beyond = Action::Return(Verdict::FailWithEperm);
        let ranges = NumberRanges::new((0..1500).map(action_of), beyond);
        assert_eq!(ranges.len(), 1501);
        let program = generate(AUDIT_ARCH_X86_64, Some(Verdict::FailWithEnosys), &ranges).unwrap();
        assert_kernel_accepts(&program);
        let stand_ins = program.iter().filter(|instruction| instruction.code == JUMP).count();
        let returns = program.iter().filter(|instruction| instruction.code == RETURN).count();
        assert!(stand_ins > 0 && returns > 4, "{stand_ins} jumps, {returns} returns: no stand-ins needed?");

        let vectors = argument_vectors();
        for number in 0..1600 {
            let action = if number < 1500 { action_of(number) } else { beyond };
            for &args in &vectors {
                let expected = match action {
                    Action::Return(verdict) => verdict.return_value(),
                    Action::CheckArguments(rule) if rule_allows(rule, args) => ALLOW,
                    Action::CheckArguments(_) => EPERM,
                };
                let decision = evaluate(&program, AUDIT_ARCH_X86_64, number, args);
                assert_eq!(decision, expected, "syscall {number}, arguments {args:#x?}");
            }
            assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | number, [0; 6]), ENOSYS);
            assert_eq!(evaluate(&program, AUDIT_ARCH_I386, number, [0; 6]), KILL_PROCESS);
        }
    }

    #[test]
    fn a_policy_beyond_the_kernel_limit_is_refused() {
        let alternate = |number: u32| {
            Action::Return(if number.is_multiple_of(2) { Verdict::Allow } else { Verdict::FailWithEperm })
        };
        let ranges = NumberRanges::new((0..5000).map(alternate), Action::Return(Verdict::FailWithEnosys));
        let result = generate(AUDIT_ARCH_X86_64, None, &ranges);
        assert!(matches!(result, Err(SeccompError::TooLong(length)) if length > BPF_MAXINSNS), "{result:?}");
    }

    #[test]
    fn an_offset_beyond_eight_bits_is_refused() {
        let mut assembler = Assembler::default();
        let target = assembler.return_verdict(Verdict::Allow);
        for _ in 0..255 {
            assembler.return_verdict(Verdict::KillProcess);
        }
        assert_eq!(assembler.short_offset(target).unwrap(), 255);
        assembler.return_verdict(Verdict::KillProcess);
        assert!(matches!(assembler.short_offset(target), Err(SeccompError::JumpOutOfRange(256))));
    }

    /// The program as this module built it with `seccompiler` until the
    /// generator replaced it, kept as the oracle the generated program must
    /// agree with.
    mod seccompiler_oracle {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
            TargetArch,
        };

        use super::super::*;
        use super::JUMP_IF_GREATER;

        /// The syscalls the oracle checks arguments of.
        pub(super) const ARGUMENT_CHECKED: [libc::c_long; 4] =
            [numbers::SYS_clone, numbers::SYS_personality, numbers::SYS_socket, numbers::SYS_ioctl];

        pub(super) fn program() -> BpfProgram {
            let target_arch = match std::env::consts::ARCH {
                "x86_64" => TargetArch::x86_64,
                "aarch64" => TargetArch::aarch64,
                other => panic!("no oracle for {other}"),
            };
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
                ALLOWED.iter().chain(ALLOWED_ON_THIS_ARCH).map(|&(_, number)| (number, Vec::new())).collect();
            let checked = [clone_rules(), personality_rules(), socket_rules(), ioctl_rules()];
            rules.extend(ARGUMENT_CHECKED.into_iter().zip(checked));
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Errno(errno(libc::EPERM)),
                SeccompAction::Allow,
                target_arch,
            )
            .unwrap();
            let mut program = enosys_prefix(native_abi().unwrap().audit_arch).to_vec();
            let compiled = seccompiler::BpfProgram::try_from(filter).unwrap();
            program.extend(compiled.into_iter().map(|i| sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            }));
            program
        }

        /// Runs before `seccompiler`'s program, which has a single errno for
        /// every refusal: answers `ENOSYS` for `clone3` and for syscalls newer
        /// than [`LAST_REVIEWED_SYSCALL`], and falls through otherwise. Another
        /// ABI's syscalls fall through to `seccompiler`'s own architecture
        /// check, which kills the process.
        fn enosys_prefix(audit_arch: u32) -> [sock_filter; 6] {
            let enosys = u32::from(SeccompAction::Errno(errno(libc::ENOSYS)));
            // Jumps count from the next instruction; index 6 is the first
            // instruction after the prefix.
            [
                /* 0 */ instruction(LOAD_WORD, ARCH_OFFSET, 0, 0),
                /* 1 */ instruction(JUMP_IF_EQUAL, audit_arch, 0, 4),
                /* 2 */ instruction(LOAD_WORD, NR_OFFSET, 0, 0),
                /* 3 */ instruction(JUMP_IF_EQUAL, syscall_number(numbers::SYS_clone3), 1, 0),
                /* 4 */ instruction(JUMP_IF_GREATER, LAST_REVIEWED_SYSCALL, 0, 1),
                /* 5 */ instruction(RETURN, enosys, 0, 0),
            ]
        }

        /// A condition on the lower 32 bits of a syscall argument.
        fn dword_condition(argument: u8, operator: SeccompCmpOp, value: u32) -> SeccompCondition {
            SeccompCondition::new(argument, SeccompCmpArgLen::Dword, operator, value.into()).unwrap()
        }

        fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
            SeccompRule::new(conditions).unwrap()
        }

        fn clone_rules() -> Vec<SeccompRule> {
            let namespaces = SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS.into());
            vec![rule(vec![dword_condition(0, namespaces, 0)])]
        }

        fn personality_rules() -> Vec<SeccompRule> {
            ALLOWED_PERSONALITIES
                .iter()
                .map(|&persona| rule(vec![dword_condition(0, SeccompCmpOp::Eq, persona)]))
                .collect()
        }

        fn socket_rules() -> Vec<SeccompRule> {
            vec![rule(vec![dword_condition(0, SeccompCmpOp::Ne, AF_VSOCK)])]
        }

        fn ioctl_rules() -> Vec<SeccompRule> {
            vec![rule(vec![
                dword_condition(1, SeccompCmpOp::Ne, TIOCSTI),
                dword_condition(1, SeccompCmpOp::Ne, TIOCLINUX),
            ])]
        }
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

    fn monotonic_nanoseconds() -> u64 {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid, writable timespec; clock_gettime is
        // async-signal-safe, so the forked child may call it.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
    }

    /// Syscalls each measuring child times under its filter: one the kernel
    /// allows without running the filter, and two it runs the filter for.
    const TIMED_SYSCALLS: [(&str, libc::c_long, [libc::c_long; 5]); 3] = [
        ("getppid (always allowed)", libc::SYS_getppid, [0; 5]),
        ("personality(0xffffffff) (argument-checked)", libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0]),
        (
            "ioctl(-1, FIONREAD) (argument-checked)",
            libc::SYS_ioctl,
            [-1, libc::FIONREAD as libc::c_long, 0, 0, 0],
        ),
    ];

    /// In a forked child: the time `seccomp(SECCOMP_SET_MODE_FILTER)` of
    /// `fprog` takes, then the mean time of `calls` calls of each of
    /// [`TIMED_SYSCALLS`] under the filter, in nanoseconds.
    fn measure_in_child(fprog: &libc::sock_fprog, calls: u64) -> [u64; 4] {
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [read_end, write_end] = pipe;
        let status = in_child(|| {
            let no_new_privs = raw(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS.into(), 1, 0, 0, 0]) == 0;
            let fprog = std::ptr::from_ref(fprog) as libc::c_long;
            let start = monotonic_nanoseconds();
            let installed =
                raw(libc::SYS_seccomp, [libc::SECCOMP_SET_MODE_FILTER.into(), 0, fprog, 0, 0]) == 0;
            let mut times = [monotonic_nanoseconds() - start, 0, 0, 0];
            for (time, (_, number, args)) in times[1..].iter_mut().zip(TIMED_SYSCALLS) {
                let start = monotonic_nanoseconds();
                for _ in 0..calls {
                    raw(number, args);
                }
                *time = (monotonic_nanoseconds() - start) / calls.max(1);
            }
            // SAFETY: writes the bytes of a live array to our pipe.
            let written =
                unsafe { libc::write(write_end, times.as_ptr().cast(), std::mem::size_of_val(&times)) };
            libc::c_int::from(!(no_new_privs && installed && written == 32))
        });
        let mut times = [0u64; 4];
        // SAFETY: reads into a live array of the given size, then closes the
        // pipe this function opened.
        let read = unsafe {
            let read = libc::read(read_end, times.as_mut_ptr().cast(), std::mem::size_of_val(&times));
            libc::close(read_end);
            libc::close(write_end);
            read
        };
        assert_eq!((exit_code(status), read), (Some(0), 32), "measuring in the child failed");
        times
    }

    /// Prints, for the `seccompiler` program, the generated one and a lone
    /// `return ALLOW` (the floor): length, instructions run per syscall, and
    /// median times to install and to make a few syscalls under the filter.
    #[test]
    #[ignore = "a measurement, not a check: cargo test --release -p quilt --lib \
                engine::seccomp::tests::measure -- --ignored --nocapture"]
    fn measure_seccompiler_and_generated_programs() {
        const RUNS: usize = 201;
        const SYSCALL_RUNS: usize = 21;
        let floor = vec![instruction(RETURN, ALLOW, 0, 0)];
        let programs = [
            ("seccompiler", seccompiler_oracle::program()),
            ("generated", default_program().unwrap()),
            ("floor", floor),
        ];
        let native = native_audit_arch();
        let vectors = argument_vectors();
        // Children that only install, as a container's init does, then
        // children that also make syscalls under the filter.
        let mut installs = [Vec::new(), Vec::new(), Vec::new()];
        let mut syscalls = [Vec::new(), Vec::new(), Vec::new()];
        for (runs, calls, measured) in [(RUNS, 0, &mut installs), (SYSCALL_RUNS, 100_000, &mut syscalls)] {
            for _ in 0..runs {
                for ((_, program), times) in programs.iter().zip(measured.iter_mut()) {
                    times.push(measure_in_child(&sock_fprog(program).unwrap(), calls));
                }
            }
        }
        for (((name, program), installs), syscalls) in programs.iter().zip(installs).zip(syscalls) {
            let allowed = ALLOWED.iter().chain(ALLOWED_ON_THIS_ARCH).map(|entry| nr(entry.1));
            let worst_allowed =
                allowed.map(|number| run(program, &seccomp_data(native, number, [0; 6])).executed).max();
            let worst_any = (0..1024)
                .flat_map(|number| vectors.iter().map(move |&args| seccomp_data(native, number, args)))
                .map(|data| run(program, &data).executed)
                .max();
            let median = |runs: &[[u64; 4]], column: usize| {
                let mut times: Vec<u64> = runs.iter().map(|times| times[column]).collect();
                times.sort_unstable();
                times[times.len() / 2]
            };
            println!(
                "{name}: {} instructions; at most {} run for an always-allowed syscall, {} for any syscall \
                 and argument; install median {:.1} µs over {RUNS} runs",
                program.len(),
                worst_allowed.unwrap(),
                worst_any.unwrap(),
                median(&installs, 0) as f64 / 1000.0,
            );
            for (column, (syscall, _, _)) in TIMED_SYSCALLS.iter().enumerate() {
                println!("    {syscall}: median {} ns per call", median(&syscalls, column + 1));
            }
        }
    }
}
