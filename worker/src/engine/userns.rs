//! User-namespace mode: a container's root is an unprivileged user on the
//! host.
//!
//! With an [`IdRange`] `START:COUNT` configured, container ids `0..COUNT`
//! are host ids `START..START+COUNT` (uids and gids alike): the container's
//! root is host uid `START`, with no privilege over anything outside its
//! container, and a process that escapes every other layer still meets the
//! host's files as an unknown user. Docker's `userns-remap` made the same
//! choice: one range per runtime, shared by its containers (which are kept
//! apart by their own mount, pid, ipc and network namespaces as always).
//!
//! How, in the container's setup process (see the `child` module):
//! - the engine makes one user namespace with that mapping when it starts
//!   ([`UserNamespace::create`]: a child cloned into a new user namespace,
//!   whose `uid_map`/`gid_map` we write, whose namespace we keep as a
//!   descriptor, and which then exits);
//! - mounts are made as today, by host root, in namespaces owned by the
//!   host's user namespace; only the presentation of files changes: each
//!   image layer is bound onto itself through an **idmapped mount** of that
//!   namespace (`mount_setattr(MOUNT_ATTR_IDMAP)`, Linux 5.12+, a filesystem
//!   that supports it: ext4, xfs, btrfs, tmpfs 6.3+), so a file that is
//!   uid 0 in the image is uid `START` on the way in, root inside; the
//!   writable layer's top directory, /dev, /dev/shm and a created working
//!   directory are owned by the container's root;
//! - after pivot_root and the read-only remount, the process enters the
//!   user namespace (setns(2), which a vfork-style child may do where
//!   unshare(2) may not), then takes its container uid and gid as usual.
//!   Its capabilities then count only inside that namespace, over files it
//!   can map, and over nothing the host's namespace owns (its network
//!   namespace included: binding a port below 1024 is allowed by setting
//!   that network namespace's `ip_unprivileged_port_start` to 0 instead).
//!
//! What the container writes lands on the writable layer as host ids
//! `START + n`; an environment build's layer is shifted back to image ids
//! (`n`) before it is committed, so cached layers hold the same ids in
//! either mode ([`unshift_tree`]).

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;

use super::sys;

/// Host ids `host_start..host_start + count` as container ids `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdRange {
    /// The host uid and gid of the container's root.
    pub host_start: u32,
    /// How many ids are mapped (65536 gives a container every 16-bit id).
    pub count: u32,
}

/// Why an id range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdRangeError {
    /// Not `START:COUNT` with two decimal numbers.
    #[error("invalid user-namespace range {0:?}: expected START:COUNT, e.g. 100000:65536")]
    Syntax(String),
    /// START 0 would map the host's root into containers.
    #[error("invalid user-namespace range: START must be at least 1 (0 is the host's root)")]
    MapsHostRoot,
    /// COUNT 0, or the range runs past the last valid id (4294967294).
    #[error(
        "invalid user-namespace range {0}:{1}: COUNT must be at least 1 and START+COUNT at most 4294967295"
    )]
    Size(u32, u32),
}

impl IdRange {
    /// A checked range.
    pub fn new(host_start: u32, count: u32) -> Result<IdRange, IdRangeError> {
        if host_start == 0 {
            return Err(IdRangeError::MapsHostRoot);
        }
        // (uid_t)-1 is not an id; the last mapped id must stay below it.
        if count == 0 || u64::from(host_start) + u64::from(count) > u64::from(u32::MAX) {
            return Err(IdRangeError::Size(host_start, count));
        }
        Ok(IdRange { host_start, count })
    }

    /// Whether container id `id` is mapped.
    pub fn maps(&self, id: u32) -> bool {
        id < self.count
    }

    /// The host id of container id `id` (which must be mapped).
    pub fn host_id(&self, id: u32) -> u32 {
        self.host_start + id
    }

    /// The container id of host id `id`, if it is in the range.
    pub fn container_id(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.host_start).filter(|inside| *inside < self.count)
    }

    /// The text of `uid_map` and `gid_map`.
    fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_start, self.count)
    }
}

impl std::str::FromStr for IdRange {
    type Err = IdRangeError;
    fn from_str(text: &str) -> Result<IdRange, IdRangeError> {
        let syntax = || IdRangeError::Syntax(text.to_owned());
        let (start, count) = text.split_once(':').ok_or_else(syntax)?;
        let number = |part: &str| {
            if part.is_empty() || !part.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(syntax());
            }
            part.parse::<u32>().map_err(|_| syntax())
        };
        IdRange::new(number(start)?, number(count)?)
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.host_start, self.count)
    }
}

/// A user namespace with an [`IdRange`]'s mapping, kept alive by its
/// descriptor (no process lives in it until a container enters it).
#[derive(Debug)]
pub(super) struct UserNamespace {
    fd: OwnedFd,
    range: IdRange,
}

impl UserNamespace {
    /// Makes the namespace: a child cloned into a new user namespace waits
    /// on a pipe while we write its maps and open its namespace, then exits
    /// when we close the pipe.
    pub(super) fn create(range: IdRange) -> std::io::Result<UserNamespace> {
        let mut ends = [0 as RawFd; 2];
        // SAFETY: pipe2 fills a two-element array.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these descriptors; nothing else owns them.
        let (hold_read, hold_write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let mut pidfd: libc::c_int = -1;
        let mut args = sys::CloneArgs {
            flags: libc::CLONE_NEWUSER as u64 | sys::CLONE_PIDFD,
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        // SAFETY: without CLONE_VM the child has its own copy of memory; it
        // only makes async-signal-safe calls on two descriptor numbers.
        let pid = unsafe { sys::clone3(&mut args) }.map_err(std::io::Error::from)?;
        if pid == 0 {
            // SAFETY: close, read and _exit on plain integers and a stack buffer.
            unsafe {
                libc::close(hold_write.as_raw_fd());
                let mut byte = 0u8;
                while libc::read(hold_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::_exit(0)
            }
        }
        // SAFETY: clone3 with CLONE_PIDFD stored a new descriptor that we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop(hold_read);
        let proc_dir = format!("/proc/{pid}");
        let made = (|| {
            std::fs::write(format!("{proc_dir}/uid_map"), range.map_line())?;
            std::fs::write(format!("{proc_dir}/gid_map"), range.map_line())?;
            std::fs::File::open(format!("{proc_dir}/ns/user")).map(OwnedFd::from)
        })();
        drop(hold_write);
        sys::wait_pidfd_blocking(pidfd.as_raw_fd());
        Ok(UserNamespace { fd: made?, range })
    }

    /// The namespace's descriptor (close-on-exec).
    pub(super) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Its mapping.
    pub(super) fn range(&self) -> IdRange {
        self.range
    }
}

/// Checks that idmapped mounts of `dir`'s filesystem work with this
/// namespace, so that a host that cannot do user-namespace mode says so
/// when the engine starts rather than at the first container.
pub(super) fn probe_idmapped_mount(namespace: &UserNamespace, dir: &Path) -> Result<(), Errno> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // A detached copy, never attached anywhere: dropped with its descriptor.
    let tree = sys::open_tree(libc::AT_FDCWD, &path, sys::OPEN_TREE_CLONE)?;
    sys::mount_setattr_idmap(tree.as_raw_fd(), namespace.fd())
}

/// Shifts the owners of every entry under `root` (itself included) from
/// host ids in `range` back to container ids: `START + n` becomes `n`.
/// Ids outside the range (an overlay whiteout, made as host root) are left
/// as they are. Symlinks are not followed; set-user-id and set-group-id
/// bits, which chown(2) clears, are put back. Returns how many entries
/// changed. Used on an environment build's layer before it is cached.
pub fn unshift_tree(root: &Path, range: IdRange) -> std::io::Result<u64> {
    remap_tree(root, |id| range.container_id(id))
}

/// The opposite of [`unshift_tree`]: container ids `n` below `COUNT` become
/// host ids `START + n`, for files the runtime puts into a writable layer
/// before the container starts (so that its root owns them).
pub fn shift_tree(root: &Path, range: IdRange) -> std::io::Result<u64> {
    remap_tree(root, |id| range.maps(id).then(|| range.host_id(id)))
}

fn remap_tree(root: &Path, map: impl Fn(u32) -> Option<u32>) -> std::io::Result<u64> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut changed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path)?;
        let (uid, gid) = (map(metadata.uid()), map(metadata.gid()));
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid.or(Some(metadata.uid())), gid.or(Some(metadata.gid())))?;
            if metadata.mode() & 0o6000 != 0 && !metadata.file_type().is_symlink() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
            }
            changed += 1;
        }
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(changed)
}

/// The user namespace of process `pid` (`"self"` for this one), as
/// (device, inode), to tell whether two processes share one.
pub(super) fn namespace_of(pid: &str) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(format!("/proc/{pid}/ns/user"))?;
    Ok((metadata.dev(), metadata.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_what_would_map_root_or_overflow() {
        let range: IdRange = "100000:65536".parse().unwrap();
        assert_eq!(range, IdRange { host_start: 100000, count: 65536 });
        assert_eq!(range.to_string(), "100000:65536");
        assert_eq!(range.host_id(1000), 101000);
        assert_eq!(range.container_id(101000), Some(1000));
        assert_eq!(range.container_id(99999), None);
        assert_eq!(range.container_id(165536), None);
        assert!(range.maps(65535) && !range.maps(65536));
        assert_eq!("0:65536".parse::<IdRange>(), Err(IdRangeError::MapsHostRoot));
        assert!(matches!("1:0".parse::<IdRange>(), Err(IdRangeError::Size(1, 0))));
        assert!("4294901760:65535".parse::<IdRange>().is_ok());
        assert!(matches!("4294901760:65536".parse::<IdRange>(), Err(IdRangeError::Size(..))));
        for bad in ["", "100000", "100000:", ":5", "a:b", "+1:5", "1:-5", "1:5:6", "99999999999:1"] {
            assert!(matches!(bad.parse::<IdRange>(), Err(IdRangeError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn unshift_moves_range_ids_back_keeps_others_and_set_id_bits() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let range = IdRange::new(200000, 65536).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upper");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        let tool = root.join("usr/bin/tool");
        std::fs::write(&tool, b"x").unwrap();
        std::os::unix::fs::chown(&tool, Some(200000), Some(201000)).unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o6755)).unwrap();
        std::os::unix::fs::chown(root.join("usr"), Some(201000), Some(201000)).unwrap();
        std::os::unix::fs::chown(&root, Some(200000), Some(200000)).unwrap();
        std::fs::write(root.join("host-written"), b"").unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("link")).unwrap();
        std::os::unix::fs::lchown(root.join("link"), Some(200005), Some(200005)).unwrap();

        assert_eq!(unshift_tree(&root, range).unwrap(), 4);
        let owner = |path: &Path| {
            let metadata = std::fs::symlink_metadata(path).unwrap();
            (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
        };
        assert_eq!(owner(&tool), (0, 1000, 0o6755));
        assert_eq!(owner(&root.join("usr")).0, 1000);
        assert_eq!(owner(&root).0, 0);
        assert_eq!(owner(&root.join("host-written")).0, 0);
        assert_eq!(owner(&root.join("link")).0, 5);
        assert_eq!(owner(&root.join("usr/bin")).0, 0);

        // And back, except what was host root's.
        assert_eq!(shift_tree(&root, range).unwrap(), 6);
        assert_eq!(owner(&tool), (200000, 201000, 0o6755));
        assert_eq!(owner(&root.join("usr")).0, 201000);
        assert_eq!(owner(&root.join("usr/bin")).0, 200000);
        assert_eq!(owner(&root.join("link")).0, 200005);
    }
}
