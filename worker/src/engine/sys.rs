//! Thin wrappers over the Linux system calls the engine needs and that
//! neither libc nor nix wraps: clone3 (and a stack for glibc's clone with
//! `CLONE_VM`), openat2, the new mount API (fsopen,
//! fsconfig, fsmount, open_tree, move_mount, mount_setattr), pidfd calls,
//! capset, close_range, the loop-device ioctls, and descriptor passing (`SCM_RIGHTS`) over the setup
//! channel.
//!
//! Every wrapper here is async-signal-safe: it allocates nothing, takes no
//! lock and logs nothing, because most of them run in the container's setup
//! process right after clone from a multi-threaded parent (STYLE.md rule 4).
//! Structures are declared here rather than taken from libc because libc's
//! coverage of these newer interfaces differs between targets.

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// `struct clone_args` (include/uapi/linux/sched.h), version 2 (with cgroup).
#[repr(C)]
#[derive(Default)]
pub(super) struct CloneArgs {
    pub(super) flags: u64,
    pub(super) pidfd: u64,
    pub(super) child_tid: u64,
    pub(super) parent_tid: u64,
    pub(super) exit_signal: u64,
    pub(super) stack: u64,
    pub(super) stack_size: u64,
    pub(super) tls: u64,
    pub(super) set_tid: u64,
    pub(super) set_tid_size: u64,
    pub(super) cgroup: u64,
}

/// `CLONE_PIDFD`.
pub(super) const CLONE_PIDFD: u64 = 0x1000;
/// `CLONE_INTO_CGROUP`.
pub(super) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct open_how` (include/uapi/linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Resolve every path component inside the directory, as if it were `/`.
pub(super) const RESOLVE_IN_ROOT: u64 = 0x10;
/// Refuse symbolic links anywhere in the path.
pub(super) const RESOLVE_NO_SYMLINKS: u64 = 0x04;
/// Refuse /proc "magic links".
pub(super) const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

const FSCONFIG_SET_FLAG: u32 = 0;
const FSCONFIG_SET_STRING: u32 = 1;
const FSCONFIG_CMD_CREATE: u32 = 6;
const FSOPEN_CLOEXEC: u32 = 1;
const FSMOUNT_CLOEXEC: u32 = 1;
/// `OPEN_TREE_CLONE`.
pub(super) const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;

/// `MOUNT_ATTR_RDONLY`.
pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x01;
/// `MOUNT_ATTR_NOSUID`.
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x02;
/// `MOUNT_ATTR_NODEV`.
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x04;
/// `MOUNT_ATTR_NOEXEC`.
pub(super) const MOUNT_ATTR_NOEXEC: u64 = 0x08;
/// `MOUNT_ATTR_IDMAP`.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `CLOSE_RANGE_CLOEXEC`.
pub(super) const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;

fn check(result: libc::c_long) -> Result<libc::c_long, Errno> {
    if result < 0 {
        Err(Errno::last())
    } else {
        Ok(result)
    }
}

fn owned(result: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = check(result)? as RawFd;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// clone3(2) without CLONE_VM: fork semantics, the child continues on a copy
/// of the caller's stack. Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// In a multi-threaded caller the child may only make async-signal-safe calls
/// until it execs or exits; everything it touches must be prepared before.
pub(super) unsafe fn clone3(args: &mut CloneArgs) -> Result<libc::pid_t, Errno> {
    // SAFETY: `args` is a valid, correctly sized clone_args; without CLONE_VM
    // the child gets its own copy of the address space (the caller's contract
    // covers what the child may do with it).
    let result =
        unsafe { libc::syscall(libc::SYS_clone3, args as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) };
    check(result).map(|pid| pid as libc::pid_t)
}

/// A stack for a child that shares our address space (`CLONE_VM`):
/// anonymous memory with an inaccessible guard page below it, unmapped on
/// drop. Only touched pages cost memory.
pub(super) struct ChildStack {
    base: *mut libc::c_void,
    size: usize,
}

impl ChildStack {
    /// Maps `size` bytes of stack plus a guard page.
    pub(super) fn new(size: usize) -> Result<ChildStack, Errno> {
        let guard = 4096;
        let total = size + guard;
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choosing; the result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        // SAFETY: the first page of the mapping just made; a stack overflow
        // then faults instead of writing over whatever lies below.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            let error = Errno::last();
            // SAFETY: unmapping exactly the mapping made above.
            unsafe { libc::munmap(base, total) };
            return Err(error);
        }
        Ok(ChildStack { base, size: total })
    }

    /// The highest address: stacks grow down on every Linux target we run on.
    pub(super) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is where a
        // downward-growing stack starts.
        unsafe { self.base.cast::<u8>().add(self.size).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; whoever ran on it (a vfork-style
        // child) has exec'd or exited by the time its owner drops it.
        unsafe { libc::munmap(self.base, self.size) };
    }
}

/// openat2(2).
pub(super) fn openat2(dirfd: RawFd, path: &CStr, flags: i32, resolve: u64) -> Result<OwnedFd, Errno> {
    let how = OpenHow { flags: (flags | libc::O_CLOEXEC) as u64, mode: 0, resolve };
    // SAFETY: path is NUL-terminated; how is a valid open_how of the size passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(result)
}

/// fsopen(2): a new, unmounted filesystem context.
pub(super) fn fsopen(fstype: &CStr) -> Result<OwnedFd, Errno> {
    // SAFETY: fstype is NUL-terminated.
    owned(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })
}

/// fsconfig(FSCONFIG_SET_STRING).
pub(super) fn fsconfig_string(fs: RawFd, key: &CStr, value: &CStr) -> Result<(), Errno> {
    // SAFETY: key and value are NUL-terminated; aux must be 0 for this command.
    check(unsafe {
        libc::syscall(libc::SYS_fsconfig, fs, FSCONFIG_SET_STRING, key.as_ptr(), value.as_ptr(), 0)
    })
    .map(drop)
}

/// fsconfig(FSCONFIG_CMD_CREATE): create the superblock.
pub(super) fn fsconfig_create(fs: RawFd) -> Result<(), Errno> {
    // SAFETY: key and value must be NULL and aux 0 for this command.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
            0,
        )
    })
    .map(drop)
}

/// fsmount(2): a detached mount of a created superblock, with mount attributes.
pub(super) fn fsmount(fs: RawFd, attributes: u64) -> Result<OwnedFd, Errno> {
    // SAFETY: plain integer arguments.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, attributes) })
}

/// open_tree(2) on a descriptor (AT_EMPTY_PATH) or a path relative to `dirfd`.
pub(super) fn open_tree(dirfd: RawFd, path: &CStr, flags: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: path is NUL-terminated.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, dirfd, path.as_ptr(), flags | OPEN_TREE_CLOEXEC) })
}

/// move_mount(2) of a detached mount onto the directory or file `target` refers to.
pub(super) fn move_mount_fd(mount: RawFd, target: RawFd) -> Result<(), Errno> {
    // SAFETY: both paths are the empty C string, used with the *_EMPTY_PATH flags.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount,
            c"".as_ptr(),
            target,
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// move_mount(2) of a detached mount onto a path (used for the root mount,
/// whose target is a trusted runtime-owned directory).
pub(super) fn move_mount_path(mount: RawFd, target: &CStr) -> Result<(), Errno> {
    // SAFETY: both paths are NUL-terminated.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// mount_setattr(2) on the mount a descriptor or path refers to.
pub(super) fn mount_setattr(dirfd: RawFd, path: &CStr, flags: i32, set: u64) -> Result<(), Errno> {
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: path is NUL-terminated; attr is a valid mount_attr of the size passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// mount_setattr(2) of `MOUNT_ATTR_IDMAP` on a detached mount: the files
/// it shows are owned through the id mapping of the user namespace
/// `userns` (an id `n` on disk appears as whatever `n` maps to there).
pub(super) fn mount_setattr_idmap(mount: RawFd, userns: RawFd) -> Result<(), Errno> {
    let attr =
        MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns as u64 };
    // SAFETY: the path is the empty C string, used with AT_EMPTY_PATH; attr
    // is a valid mount_attr of the size passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// fchownat(2) without following a final symlink; an empty `name` means
/// `dirfd` itself.
pub(super) fn chown_at(dirfd: RawFd, name: &CStr, uid: u32, gid: u32) -> Result<(), Errno> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: name is NUL-terminated.
    check(unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, flags) } as libc::c_long).map(drop)
}

/// pidfd_send_signal(2).
pub(super) fn pidfd_send_signal(pidfd: RawFd, signal: i32) -> Result<(), Errno> {
    // SAFETY: info NULL means "as kill(2) would"; flags must be 0.
    check(unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd, signal, std::ptr::null::<u8>(), 0) })
        .map(drop)
}

/// What waitid reported for a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChildExit {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// waitid(P_PIDFD, WEXITED | WNOHANG): `None` while the child still runs.
pub(super) fn wait_pidfd_nohang(pidfd: RawFd) -> Result<Option<ChildExit>, Errno> {
    // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid out-pointer; the rusage pointer may be NULL.
    check(unsafe {
        libc::syscall(
            libc::SYS_waitid,
            libc::P_PIDFD,
            pidfd,
            &mut info as *mut libc::siginfo_t,
            libc::WEXITED | libc::WNOHANG,
            std::ptr::null::<libc::rusage>(),
        )
    })?;
    // SAFETY: waitid filled in the SIGCHLD fields of the union (or left the pid 0).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ChildExit::Exited(status),
        _ => ChildExit::Signaled(status),
    }))
}

/// Capability sets for capset(2).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: i32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// capset(2) for the calling thread, 64-bit masks.
pub(super) fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    let header = CapUserHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [
        CapUserData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: inheritable as u32,
        },
        CapUserData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: header and the two-element data array are what version 3 expects.
    check(unsafe { libc::syscall(libc::SYS_capset, &header as *const CapUserHeader, data.as_ptr()) })
        .map(drop)
}

/// `struct loop_info64` (include/uapi/linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// `LOOP_CTL_GET_FREE`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8).
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// The device detaches itself when its last user (a mount) is gone.
pub(super) const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// I/O bypasses the page cache of the backing file.
pub(super) const LO_FLAGS_DIRECT_IO: u32 = 16;

/// ioctl(LOOP_CTL_GET_FREE) on /dev/loop-control: the number of a free
/// loop device, made if needed.
pub(super) fn loop_get_free(control: RawFd) -> Result<u32, Errno> {
    // SAFETY: an ioctl without argument.
    let number = check(unsafe { libc::ioctl(control, LOOP_CTL_GET_FREE) } as libc::c_long)?;
    u32::try_from(number).map_err(|_| Errno::ERANGE)
}

/// ioctl(LOOP_CONFIGURE): backs loop device `device` with the file `backing`.
pub(super) fn loop_configure(device: RawFd, backing: RawFd, flags: u32) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: u32::try_from(backing).map_err(|_| Errno::EBADF)?,
        block_size: 0,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            size_limit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`.
    check(unsafe { libc::ioctl(device, LOOP_CONFIGURE, &config as *const LoopConfig) } as libc::c_long)
        .map(drop)
}

/// fsconfig(FSCONFIG_SET_FLAG): a mount option without a value.
pub(super) fn fsconfig_flag(fs: RawFd, key: &CStr) -> Result<(), Errno> {
    // SAFETY: key is NUL-terminated; value must be NULL and aux 0.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })
    .map(drop)
}

/// close_range(2).
pub(super) fn close_range(first: u32, last: u32, flags: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) }).map(drop)
}

/// `struct ifreq` as far as SIOCGIFFLAGS/SIOCSIFFLAGS use it.
#[repr(C)]
struct InterfaceFlagsRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _padding: [u8; 22],
}

/// Bring the loopback interface of the current network namespace up.
pub(super) fn loopback_up() -> Result<(), Errno> {
    // SAFETY: plain integer arguments.
    let socket = owned(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) as libc::c_long
    })?;
    let mut request = InterfaceFlagsRequest { name: [0; libc::IFNAMSIZ], flags: 0, _padding: [0; 22] };
    request.name[..2].copy_from_slice(b"lo");
    use std::os::fd::AsRawFd;
    // SAFETY: request is a valid ifreq-sized buffer for these two ioctls.
    unsafe {
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) as libc::c_long)?;
        request.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) as libc::c_long)?;
    }
    Ok(())
}

/// Write all of `bytes` to a raw descriptor, retrying on EINTR.
pub(super) fn write_all_raw(fd: RawFd, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        // SAFETY: bytes is a valid buffer of the given length.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written < 0 {
            let errno = Errno::last();
            if errno == Errno::EINTR {
                continue;
            }
            return Err(errno);
        }
        bytes = &bytes[written as usize..];
    }
    Ok(())
}

/// Register a pidfd with tokio's reactor to await the child's exit.
pub(super) fn register_pidfd(pidfd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid descriptor that the AsyncFd owns from
    // here on; nothing else closes or replaces it while it is registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Most descriptors one message on a setup channel carries.
pub(super) const MAX_PASSED_DESCRIPTORS: usize = 2;

/// Room for one `SCM_RIGHTS` control message of up to [`MAX_PASSED_DESCRIPTORS`]
/// descriptors (`CMSG_SPACE(8)` is 24 bytes on 64-bit Linux), aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// sendmsg(2) of `data` with `descriptors` attached (`SCM_RIGHTS`) on a connected Unix
/// socket, with `MSG_NOSIGNAL` (a vanished parent gives `EPIPE`, not a SIGPIPE that kills the
/// setup process before it can report). Async-signal-safe: stack buffers only.
pub(super) fn send_with_descriptors(socket: RawFd, data: &[u8], descriptors: &[RawFd]) -> Result<(), Errno> {
    if descriptors.len() > MAX_PASSED_DESCRIPTORS {
        return Err(Errno::EINVAL);
    }
    let mut control = ControlBuffer([0; 64]);
    let payload = std::mem::size_of_val(descriptors) as libc::c_uint;
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is a valid empty header (on musl too, whose has padding fields).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !descriptors.is_empty() {
        header.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        header.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: the header names a control buffer of msg_controllen bytes (<= 64, checked by
        // the descriptor count above), so CMSG_FIRSTHDR returns a pointer into it, and
        // CMSG_DATA leaves room for `payload` bytes after the cmsghdr.
        unsafe {
            let message = libc::CMSG_FIRSTHDR(&header);
            (*message).cmsg_level = libc::SOL_SOCKET;
            (*message).cmsg_type = libc::SCM_RIGHTS;
            (*message).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                descriptors.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(message),
                payload as usize,
            );
        }
    }
    loop {
        // SAFETY: header points at iov, data and control, all alive for the call.
        let sent = unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            let errno = Errno::last();
            if errno == Errno::EINTR {
                continue;
            }
            return Err(errno);
        }
        // A SOCK_SEQPACKET message goes whole or not at all.
        return if sent as usize == data.len() { Ok(()) } else { Err(Errno::EMSGSIZE) };
    }
}

/// One message read with [`receive_with_descriptors`].
pub(super) struct ReceivedMessage {
    /// Bytes of data placed in the buffer; 0 with no descriptors is end of file.
    pub(super) length: usize,
    /// Descriptors that came with it, close-on-exec, owned.
    pub(super) descriptors: Vec<OwnedFd>,
    /// The data or the control part did not fit (`MSG_TRUNC`, `MSG_CTRUNC`): whatever
    /// arrived is in the other fields, the rest is lost.
    pub(super) truncated: bool,
}

/// recvmsg(2) of one message with `MSG_DONTWAIT | MSG_CMSG_CLOEXEC`, taking ownership of
/// every descriptor that came with it (also when the message was truncated, so none leaks).
/// `EAGAIN` when nothing is queued. For the runtime (it allocates).
pub(super) fn receive_with_descriptors(socket: RawFd, buffer: &mut [u8]) -> Result<ReceivedMessage, Errno> {
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len() as _;
    // SAFETY: header points at buffer (through iov) and control, both alive for the call and of
    // the lengths given.
    let received = unsafe { libc::recvmsg(socket, &mut header, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(Errno::last());
    }
    let mut descriptors = Vec::new();
    // SAFETY: the kernel filled the control buffer and set msg_controllen to what it wrote;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it, and each SCM_RIGHTS message holds
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors, read unaligned.
    unsafe {
        let mut message = libc::CMSG_FIRSTHDR(&header);
        while !message.is_null() {
            if (*message).cmsg_level == libc::SOL_SOCKET && (*message).cmsg_type == libc::SCM_RIGHTS {
                let bytes = ((*message).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(message).cast::<libc::c_int>();
                for index in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    // The kernel installed this descriptor in our table for us alone.
                    descriptors.push(OwnedFd::from_raw_fd(data.add(index).read_unaligned()));
                }
            }
            message = libc::CMSG_NXTHDR(&header, message);
        }
    }
    Ok(ReceivedMessage {
        length: received as usize,
        descriptors,
        truncated: header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
    })
}

/// Register a socket with tokio's reactor to await incoming messages.
pub(super) fn register_socket(socket: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: as in `register_pidfd`: the AsyncFd owns the descriptor from here on.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// mkdirat(2) of one name relative to a directory descriptor.
pub(super) fn mkdirat(dirfd: RawFd, name: &CStr, mode: libc::mode_t) -> Result<(), Errno> {
    // SAFETY: name is NUL-terminated.
    check(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode) } as libc::c_long).map(drop)
}

/// Makes a child spawned by `command` receive `signal` when the thread that
/// spawned it dies (prctl PR_SET_PDEATHSIG), so a helper process such as
/// the embedded nats-server does not outlive a Quilt that was SIGKILLed.
/// A parent that died between the fork and the prctl is caught by comparing
/// the parent pid after it.
pub fn set_parent_death_signal(command: &mut tokio::process::Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (getppid, prctl, kill, getpid) on integers.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), signal);
            }
            Ok(())
        });
    }
}

/// pidfd_open(2): a close-on-exec pidfd of process `pid`. A pidfd pins the
/// process it was opened for: once the caller has checked that this process
/// is the one it expects (its start time), signals and waits through the
/// descriptor cannot reach a later process that reuses the pid.
pub(super) fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags (0: pidfds are always close-on-exec).
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// setns(2) of the calling thread.
pub(super) fn setns(fd: RawFd, namespaces: libc::c_int) -> Result<(), Errno> {
    // SAFETY: setns with a descriptor and flags.
    check(unsafe { libc::setns(fd, namespaces) } as libc::c_long).map(drop)
}

/// waitid(P_PIDFD, WEXITED | WNOHANG) to reap a child whose status is not
/// needed (its own exit report lives elsewhere). `ECHILD` (not our child,
/// or already reaped) is not an error.
pub(super) fn reap_pidfd(pidfd: RawFd) {
    match wait_pidfd_nohang(pidfd) {
        Ok(_) | Err(Errno::ECHILD) => {}
        Err(errno) => tracing::debug!(%errno, "reaping a shim"),
    }
}

/// waitid(P_PIDFD, WEXITED), blocking, for a child known to be exiting
/// right away; the status is not needed.
pub(super) fn wait_pidfd_blocking(pidfd: RawFd) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid out-buffer.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a pidfd and a valid out-pointer.
        let result = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, libc::WEXITED) };
        if result == 0 || Errno::last() != Errno::EINTR {
            return;
        }
    }
}

/// Takes ownership of descriptor `fd` that a parent placed before exec (the
/// shim's fds 3 to 5), after checking that it is open. Call it once per
/// descriptor, before anything else in the process could own or close it.
pub fn take_inherited_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // F_GETFD fails with EBADF on a closed descriptor.
    // SAFETY: fcntl(F_GETFD) reads the descriptor's flags and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and, per this
    // function's contract, owned by nothing else in the process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structures_match_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
