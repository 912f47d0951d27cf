//! Disk layers: a container's writable layer on disk, as an ext4 filesystem
//! of its own, so that its size is a limit.
//!
//! A container with [`Scratch::Disk`] (long-running containers, `quilt run
//! --local --scratch disk`) gets an image file, `<state>/<id>/layer.img`, of
//! exactly its scratch size: allocated in full when it is made (so a layer
//! that was made can always be filled, and a host without room refuses it
//! up front, "no space"), then formatted with `mkfs.ext4`. At each start the
//! engine attaches the image to a free loop device (`LOOP_CONFIGURE`, with
//! `LO_FLAGS_AUTOCLEAR`) and mounts it detached (fsmount: in no mount
//! namespace yet; the setup process, already in the container's cgroup,
//! could not open a block device), and the setup process moves that mount
//! into the container's own mount namespace, at `<state>/<id>/layer`. It
//! holds the overlay's `upper` and `work` directories. So:
//!
//! - a fill stops at the layer's size (ENOSPC inside the container), and the
//!   data directory's filesystem, with the event log, the broker's store,
//!   the image store and the output captures, never sees it;
//! - the mount exists only in the container's namespace: when its last
//!   process ends, the kernel unmounts it and the loop device detaches
//!   itself, so a crash of the runtime leaves no mount and no device behind;
//!   the image is an ordinary file, removed with the container's directory;
//! - a long-running container's image is kept between its runs and mounted
//!   again at each.
//!
//! Where this cannot work (no `mkfs.ext4`, no loop devices, no ext4), the
//! engine says so once at start and disk layers are plain directories, not
//! size-limited ([`Scratch::Directory`], which environment builds always
//! use: their layer is the directory itself, renamed into the store).
//!
//! [`Scratch::Disk`]: super::Scratch::Disk
//! [`Scratch::Directory`]: super::Scratch::Directory

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::sys;

/// The image file in a container's directory.
pub(super) const IMAGE: &str = "layer.img";
/// Its mount point in a container's directory.
pub(super) const MOUNT_POINT: &str = "layer";

/// Where `mkfs.ext4` is looked for.
const MKFS_PATHS: &[&str] =
    &["/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4", "/bin/mkfs.ext4", "/usr/bin/mkfs.ext4"];
const LOOP_CONTROL: &str = "/dev/loop-control";

/// Why a disk layer could not be made or attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskLayerError {
    /// The data directory's filesystem has no room for the layer.
    #[error("no space for a {size} MiB disk layer at {path}", size = bytes >> 20)]
    NoSpace {
        /// The image file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Making the image file failed.
    #[error("making the disk layer {path}: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// mkfs.ext4 failed.
    #[error("formatting the disk layer {path}: {message}")]
    Format {
        /// The image file.
        path: PathBuf,
        /// What mkfs said.
        message: String,
    },
    /// Its filesystem could not be mounted.
    #[error("mounting the disk layer {path}: {step}: {errno}", errno = source.desc())]
    Mount {
        /// The image file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Why.
        source: Errno,
    },
    /// No loop device could be had for it.
    #[error("attaching the disk layer {path} to a loop device: {step}: {errno}", errno = source.desc())]
    Attach {
        /// The image file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Why.
        source: Errno,
    },
}

/// What making disk layers needs on this host.
#[derive(Debug)]
pub(super) struct DiskLayers {
    mkfs: PathBuf,
}

impl DiskLayers {
    /// Finds `mkfs.ext4`, the loop control device and ext4; the reason when
    /// one is missing.
    pub(super) fn probe() -> Result<DiskLayers, String> {
        let mkfs = MKFS_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .ok_or_else(|| "mkfs.ext4 was not found (install e2fsprogs)".to_string())?;
        std::fs::File::options()
            .read(true)
            .write(true)
            .open(LOOP_CONTROL)
            .map_err(|error| format!("{LOOP_CONTROL}: {error}"))?;
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems.lines().any(|line| line.split_whitespace().last() == Some("ext4")) {
            return Err("the kernel has no ext4".into());
        }
        Ok(DiskLayers { mkfs })
    }

    /// Makes the image file `image`, of `bytes`, allocated in full, and
    /// formats it. Takes some milliseconds (mkfs.ext4 runs). The image is
    /// made under another name and renamed into place once formatted, so a
    /// crash never leaves a half-made `image` that a later start would
    /// take for a layer.
    pub(super) fn make(&self, image: &Path, bytes: u64) -> Result<(), DiskLayerError> {
        let partial = image.with_extension("img.partial");
        let result = self.make_at(&partial, bytes).and_then(|()| {
            std::fs::rename(&partial, image)
                .map_err(|source| DiskLayerError::Image { path: image.to_path_buf(), source })
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map_err(|error| match error {
            DiskLayerError::NoSpace { bytes, .. } => {
                DiskLayerError::NoSpace { path: image.to_path_buf(), bytes }
            }
            other => other,
        })
    }

    fn make_at(&self, image: &Path, bytes: u64) -> Result<(), DiskLayerError> {
        let failed = |source| DiskLayerError::Image { path: image.to_path_buf(), source };
        // Left by a crash half-way, if anything.
        match std::fs::remove_file(image) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(failed(error)),
        }
        let file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)
            .map_err(failed)?;
        let length = libc::off_t::try_from(bytes)
            .map_err(|_| failed(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, length) {
            Ok(()) => {}
            Err(Errno::ENOSPC) => return Err(DiskLayerError::NoSpace { path: image.to_path_buf(), bytes }),
            // A filesystem without fallocate: a sparse file, which takes its
            // space as it is written.
            Err(Errno::EOPNOTSUPP) => file.set_len(bytes).map_err(failed)?,
            Err(errno) => return Err(failed(errno.into())),
        }
        drop(file);
        // 4 KiB blocks; nothing reserved for root (the container's root is
        // the only user); no discard of an image that is all unwritten
        // extents; inode tables and journal left to the kernel, which the
        // mount tells not to zero them (`noinit_itable`: they read as zero).
        let output = std::process::Command::new(&self.mkfs)
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg(image)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(failed)?;
        if !output.status.success() {
            return Err(DiskLayerError::Format {
                path: image.to_path_buf(),
                message: format!("{} ({})", String::from_utf8_lossy(&output.stderr).trim(), output.status),
            });
        }
        // mkfs.ext4 flushed what it wrote; made durable before the rename.
        std::fs::File::open(image).and_then(|file| file.sync_all()).map_err(failed)
    }
}

/// Attaches the disk layer `image` to a loop device and mounts it,
/// detached; makes its `upper` and `work` directories unless it has them
/// (a long-running container's later runs), a new `upper` owned by
/// `owner`. The mount goes when its descriptor is closed unless it was
/// moved into a mount namespace meanwhile; the loop device goes with it.
pub(super) fn mount(image: &Path, owner: Option<(u32, u32)>) -> Result<OwnedFd, DiskLayerError> {
    let device = attach(image)?;
    let failed = |step, source| DiskLayerError::Mount { path: image.to_path_buf(), step, source };
    let context = sys::fsopen(c"ext4").map_err(|errno| failed("fsopen", errno))?;
    sys::fsconfig_string(context.as_raw_fd(), c"source", &device.path)
        .map_err(|errno| failed("source", errno))?;
    // The inode tables of a freshly allocated image read as zero already:
    // no background zeroing.
    sys::fsconfig_flag(context.as_raw_fd(), c"noinit_itable")
        .map_err(|errno| failed("noinit_itable", errno))?;
    sys::fsconfig_create(context.as_raw_fd()).map_err(|errno| failed("mounting", errno))?;
    let mount =
        sys::fsmount(context.as_raw_fd(), sys::MOUNT_ATTR_NODEV).map_err(|errno| failed("fsmount", errno))?;
    // The mount holds the device now; the descriptor may go.
    drop(device);
    for name in [c"upper", c"work"] {
        match sys::mkdirat(mount.as_raw_fd(), name, 0o755) {
            Ok(()) => {
                if let (Some((uid, gid)), true) = (owner, name == c"upper") {
                    sys::chown_at(mount.as_raw_fd(), name, uid, gid)
                        .map_err(|errno| failed("chown upper", errno))?;
                }
            }
            Err(Errno::EEXIST) => {}
            Err(errno) => return Err(failed("mkdir", errno)),
        }
    }
    Ok(mount)
}

/// A disk layer's image attached to a loop device. The device detaches
/// itself once this is dropped and nothing has it mounted.
#[derive(Debug)]
struct LoopDevice {
    _device: OwnedFd,
    /// `/dev/loopN`.
    path: CString,
}

/// Attaches `image` to a free loop device.
fn attach(image: &Path) -> Result<LoopDevice, DiskLayerError> {
    let failed = |step, source| DiskLayerError::Attach { path: image.to_path_buf(), step, source };
    let errno_of = |error: std::io::Error| Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO));
    let open = |path: &Path| {
        std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map(OwnedFd::from)
            .map_err(errno_of)
    };
    let backing = open(image).map_err(|errno| failed("opening the image", errno))?;
    let control =
        open(Path::new(LOOP_CONTROL)).map_err(|errno| failed("opening /dev/loop-control", errno))?;
    let mut flags = sys::LO_FLAGS_AUTOCLEAR | sys::LO_FLAGS_DIRECT_IO;
    // Another process may take the free device between the two calls.
    for _ in 0..32 {
        let number = sys::loop_get_free(control.as_raw_fd())
            .map_err(|errno| failed("finding a free device", errno))?;
        let path = format!("/dev/loop{number}");
        let device = open(Path::new(&path)).map_err(|errno| failed("opening the device", errno))?;
        match sys::loop_configure(device.as_raw_fd(), backing.as_raw_fd(), flags) {
            Ok(()) => {
                let path = CString::new(path).map_err(|_| failed("naming the device", Errno::EINVAL))?;
                return Ok(LoopDevice { _device: device, path });
            }
            Err(Errno::EBUSY) => continue,
            // The backing filesystem cannot do direct I/O: cached I/O.
            Err(Errno::EINVAL) if flags & sys::LO_FLAGS_DIRECT_IO != 0 => {
                flags &= !sys::LO_FLAGS_DIRECT_IO;
            }
            Err(errno) => return Err(failed("configuring the device", errno)),
        }
    }
    Err(failed("finding a free device", Errno::EBUSY))
}

/// Loop devices whose backing file is under `dir`, as "loopN: file": after
/// its containers are gone, the disk layers that outlived them (there
/// should be none). Read from `/sys/block/loop*/loop/backing_file`.
pub fn loop_devices_backed_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return found };
    for entry in entries.flatten() {
        if let Ok(file) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(file.trim()).starts_with(dir) {
                found.push(format!("{}: {}", entry.file_name().to_string_lossy(), file.trim()));
            }
        }
    }
    found
}
