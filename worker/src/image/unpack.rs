//! Unpacking one OCI/Docker image layer into a directory that becomes an
//! overlayfs lower layer.
//!
//! This module owns the layer's tar stream (plain, gzip or zstd), the
//! uncompressed digest (`diff_id`) computed while reading it, and everything
//! created inside the target directory. It must not touch anything outside
//! that directory: every file operation goes through a descriptor of the
//! target, the parent of each entry is resolved with `openat2(2)` and
//! `RESOLVE_IN_ROOT`, and the final component is acted on with `*at` calls
//! that never follow a symlink. It does not verify the compressed digest and
//! does not clean up after an error: the caller checks the blob digest,
//! compares `diff_id` with the image config, and removes the target directory
//! when unpacking fails. Nothing here uses `unsafe`; openat2 needs Linux 5.6 or
//! later, and without it unpacking fails rather than falling back to a weaker
//! resolution.
//!
//! The tar crate parses headers, but in raw mode: it would otherwise read GNU
//! long names and PAX headers of any declared size into memory before we
//! could look at them. No maintained crate unpacks into a directory through
//! in-root resolution, so the filesystem side is written here.
//!
//! Defences, each with the incident it answers:
//!
//! - Absolute names and `..` components are errors, never silently fixed
//!   (the "Zip Slip" class; Docker CVE-2014-9356 wrote outside the rootfs
//!   through a full pathname).
//! - Parents are resolved inside the target with `RESOLVE_IN_ROOT`, so a
//!   symlink planted by an earlier entry (`evil -> /etc`, then `evil/passwd`)
//!   resolves inside the layer (Docker CVE-2014-6407: symlink and hardlink
//!   attacks in a pulled image; CVE-2018-15664: path resolution raced against
//!   a symlink swap). `RESOLVE_NO_MAGICLINKS` keeps `/proc/self/...`-style
//!   links out as well.
//! - Owner, mode and times are set through the descriptor of the object just
//!   created, never by path (containerd CVE-2021-32760 changed permissions of
//!   host files through a symlink in a crafted image).
//! - A name that already exists is removed before the new entry is created
//!   with `O_EXCL`, so a write never goes through an old symlink or into an
//!   old hardlinked inode (tar-rs CVE-2018-20990 overwrote files through
//!   links).
//! - Hardlink targets obey the same name rules and are resolved inside the
//!   target; `linkat` does not follow a symlink source, so a link can only
//!   name an inode of this layer (CVE-2014-6407 again; tar-rs CVE-2021-38511).
//! - Whiteouts are converted to overlay form (a 0:0 character device, or the
//!   `trusted.overlay.opaque` xattr) and must name a sibling: a bare `.wh.`
//!   or `.wh..` would delete the parent directory (anchore/stereoscope#647),
//!   and `.wh...` names `..`.
//! - Device nodes are skipped and reported: a block node for a host disk in
//!   an image would otherwise only be stopped by the devices cgroup.
//! - Only `security.capability` and `user.*` xattrs are applied: `trusted.*`
//!   would forge overlay metadata (opaque, redirect, metacopy) and
//!   `security.selinux` would relabel files for the host's policy.
//! - Per-file size, total size and entry count are capped, the declared size
//!   checked before any data is read; extension headers (GNU long names, PAX)
//!   are capped at 1 MiB (Go CVE-2022-2879: unbounded PAX header reads
//!   exhausted memory), and data after the end of the archive at 1 MiB.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{
    fchmod, fstat, fstatat, futimens, makedev, mkdirat, mknodat, utimensat, FileStat, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{dup, fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};
use tar::EntryType;
use xattr::FileExt;

/// Largest GNU long-name, long-link or PAX header we read into memory.
const EXTENSION_HEADER_LIMIT: u64 = 1 << 20;

/// Largest amount of data accepted after the tar end-of-archive marker.
/// Tools pad to a record size (10 KiB for GNU tar); anything near a megabyte
/// is a decompression bomb hidden behind the archive.
const TRAILING_DATA_LIMIT: u64 = 1 << 20;

/// How often an in-root resolution is retried when the kernel reports a
/// concurrent rename (`EAGAIN`, see openat2(2)).
const RESOLVE_RETRIES: u32 = 16;

/// The xattr overlayfs reads to mark a directory opaque.
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Prefix marking a whiteout in an OCI layer.
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Prefix of AUFS metadata entries (`.wh..wh.plnk`, `.wh..wh.aufs`).
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";

/// Name of the opaque-directory marker.
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip, possibly several members back to back.
    Gzip,
    /// zstd, possibly several frames back to back.
    Zstd,
}

impl Compression {
    /// The compression of an OCI or Docker layer media type, or `None` when
    /// the media type is not a layer type this module unpacks.
    pub(crate) fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Sniffs the compression from the first bytes of a blob: `1f 8b` is gzip,
    /// `28 b5 2f fd` is zstd, anything else is taken as a plain tar stream.
    pub(crate) fn sniff(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Caps on what one layer may put on disk.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Largest size of one entry, as declared and as read.
    pub max_file_bytes: u64,
    /// Largest sum of declared entry sizes and extension headers.
    pub max_total_bytes: u64,
    /// Most entries (members and global PAX headers) in the layer.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// 4 GiB per file, 16 GiB in total, a million entries.
    fn default() -> Self {
        UnpackLimits { max_file_bytes: 4 << 30, max_total_bytes: 16 << 30, max_entries: 1_000_000 }
    }
}

/// What an unpacked layer contained.
#[derive(Debug, Clone)]
pub struct UnpackReport {
    /// Entries processed (members and global PAX headers).
    pub(crate) entries: u64,
    /// Bytes of regular-file content written.
    pub(crate) bytes: u64,
    /// `sha256:<hex>` of the whole uncompressed tar stream, to compare with the
    /// image config's `rootfs.diff_ids`.
    pub(crate) diff_id: String,
    /// Entries or attributes that were deliberately not reproduced.
    pub(crate) neutralised: Vec<Neutralised>,
}

/// An entry or attribute of the layer that was skipped or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Neutralised {
    /// The entry's normalised path inside the layer.
    pub(crate) path: String,
    /// Why it was not reproduced.
    pub(crate) reason: &'static str,
}

/// Why unpacking a layer failed. The target directory may hold a partial
/// layer afterwards; the caller removes it.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The target could not be opened as a directory (it must not be a
    /// symlink).
    #[error("opening unpack target {path}")]
    OpenTarget {
        /// The target path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: Errno,
    },
    /// The target directory already had entries.
    #[error("unpack target {path} is not empty")]
    TargetNotEmpty {
        /// The target path.
        path: PathBuf,
    },
    /// Reading the layer blob failed.
    #[error("reading the layer stream")]
    Read {
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// The blob is not valid data for its compression.
    #[error("decompressing the layer stream ({compression:?})")]
    Decompress {
        /// The compression that was expected.
        compression: Compression,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The uncompressed stream is not a well-formed tar archive.
    #[error("parsing the tar stream")]
    Parse {
        /// The tar parser's error.
        #[source]
        source: io::Error,
    },
    /// The archive's extension headers are inconsistent.
    #[error("malformed tar stream: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// A GNU long name, long link or PAX header is larger than we read.
    #[error("extension header of {size} bytes is over the {limit}-byte limit")]
    ExtensionTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A numeric header field (uid, gid, mode, mtime, size) is invalid.
    #[error("entry {path:?}: invalid {field} field")]
    HeaderField {
        /// The entry's name as found in the archive.
        path: String,
        /// The field.
        field: &'static str,
        /// Why it does not parse.
        #[source]
        source: io::Error,
    },
    /// The entry's name is absolute.
    #[error("entry {path:?} has an absolute path")]
    AbsolutePath {
        /// The entry's name as found in the archive.
        path: String,
    },
    /// The entry's name has a `..` component.
    #[error("entry {path:?} has a '..' component")]
    PathEscape {
        /// The entry's name as found in the archive.
        path: String,
    },
    /// The entry's name (or link text) cannot name a file.
    #[error("entry {path:?} has an invalid name: {reason}")]
    InvalidPath {
        /// The entry's name as found in the archive.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A hardlink names something outside the layer.
    #[error("hardlink {path:?} points outside the layer: {target:?}")]
    HardlinkEscape {
        /// The hardlink's normalised path.
        path: String,
        /// The link target as found in the archive.
        target: String,
    },
    /// A hardlink's source does not exist in this layer.
    #[error("hardlink {path:?}: source {target:?} is not in this layer")]
    HardlinkSource {
        /// The hardlink's normalised path.
        path: String,
        /// The link target as found in the archive.
        target: String,
        /// The lookup's error.
        #[source]
        source: Errno,
    },
    /// A whiteout names no sibling (`.wh.`, `.wh..`, `.wh...`).
    #[error("whiteout {path:?} does not name an entry of its directory")]
    WhiteoutEscape {
        /// The whiteout's name as found in the archive.
        path: String,
    },
    /// A whiteout name is used as a directory (`.wh.x/y`).
    #[error("whiteout {path:?} is used as a directory")]
    WhiteoutAsDirectory {
        /// The entry's name as found in the archive.
        path: String,
    },
    /// The entry's type is not one a layer may contain.
    #[error("entry {path:?} has unsupported type {type_flag:?}")]
    UnsupportedEntry {
        /// The entry's name as found in the archive.
        path: String,
        /// The tar type flag.
        type_flag: char,
    },
    /// An entry is larger than the per-file limit.
    #[error("entry {path:?} is {size} bytes, over the per-file limit of {limit}")]
    FileTooLarge {
        /// The entry's normalised path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer is larger than the total limit.
    #[error("layer exceeds the total limit of {limit} bytes at entry {path:?}")]
    TotalTooLarge {
        /// The entry that crossed the limit.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The layer has too many entries.
    #[error("layer has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// The stream ended inside an entry's data.
    #[error("entry {path:?} is truncated: {actual} of {expected} bytes")]
    Truncated {
        /// The entry's normalised path.
        path: String,
        /// The declared size.
        expected: u64,
        /// The bytes present.
        actual: u64,
    },
    /// Too much data follows the end of the archive.
    #[error("more than {limit} bytes follow the end of the tar archive")]
    TrailingData {
        /// The limit.
        limit: u64,
    },
    /// The entry's parent directory could not be resolved or created inside
    /// the target.
    #[error("resolving the parent directory of {path:?}")]
    ResolveParent {
        /// The entry's normalised path.
        path: String,
        /// The failure.
        #[source]
        source: Errno,
    },
    /// An earlier entry of the same name could not be removed.
    #[error("replacing {path:?}")]
    Replace {
        /// The entry's normalised path.
        path: String,
        /// The failure.
        #[source]
        source: Errno,
    },
    /// Creating the entry failed.
    #[error("creating {path:?}")]
    Create {
        /// The entry's normalised path.
        path: String,
        /// The failure.
        #[source]
        source: Errno,
    },
    /// Writing a regular file's content failed.
    #[error("writing {path:?}")]
    Write {
        /// The entry's normalised path.
        path: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Setting owner, mode or times failed.
    #[error("setting the {step} of {path:?}")]
    SetMetadata {
        /// The entry's normalised path.
        path: String,
        /// `owner`, `mode` or `mtime`.
        step: &'static str,
        /// The failure.
        #[source]
        source: Errno,
    },
    /// Setting an allowed xattr failed.
    #[error("setting xattr {name} on {path:?}")]
    SetXattr {
        /// The entry's normalised path.
        path: String,
        /// The xattr name.
        name: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// Unpack `reader` into `target`, which must be an existing empty directory.
///
/// Nothing outside `target` is created, changed or removed, whatever the
/// layer contains. On error `target` may hold part of the layer; the caller
/// removes it.
pub fn unpack_layer(
    reader: impl Read,
    compression: Compression,
    target: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackReport, UnpackError> {
    let root = open_target(target)?;
    let source = SourceReader { inner: reader };
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(source),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(source)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(source)
                .map_err(|source| UnpackError::Decompress { compression, source })?,
        ),
    };
    let mut archive = tar::Archive::new(HashingReader { inner: decoded, hasher: Sha256::new() });
    let mut unpacker = Unpacker {
        root,
        limits: *limits,
        compression,
        entries: 0,
        file_bytes: 0,
        budget_used: 0,
        neutralised: Vec::new(),
        directory_times: BTreeMap::new(),
    };
    unpacker.unpack_entries(&mut archive)?;

    // The diff_id covers the whole uncompressed stream, including the second
    // end-of-archive block and any record padding.
    let mut stream = archive.into_inner();
    let trailing = io::copy(&mut (&mut stream).take(TRAILING_DATA_LIMIT + 1), &mut io::sink())
        .map_err(|error| classify_stream_error(error, compression))?;
    if trailing > TRAILING_DATA_LIMIT {
        return Err(UnpackError::TrailingData { limit: TRAILING_DATA_LIMIT });
    }
    unpacker.apply_directory_times()?;

    let digest = stream.hasher.finalize();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(UnpackReport {
        entries: unpacker.entries,
        bytes: unpacker.file_bytes,
        diff_id: format!("sha256:{hex}"),
        neutralised: unpacker.neutralised,
    })
}

/// Opens the target directory, refusing a symlink, and checks it is empty.
fn open_target(target: &Path) -> Result<OwnedFd, UnpackError> {
    let open_error = |source| UnpackError::OpenTarget { path: target.to_path_buf(), source };
    let root = openat(
        AT_FDCWD,
        target,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_error)?;
    let mut listing = Dir::from_fd(dup(&root).map_err(open_error)?).map_err(open_error)?;
    for entry in listing.iter() {
        let entry = entry.map_err(open_error)?;
        if !is_dot_or_dot_dot(entry.file_name().to_bytes()) {
            return Err(UnpackError::TargetNotEmpty { path: target.to_path_buf() });
        }
    }
    Ok(root)
}

fn is_dot_or_dot_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// Which stage of the stream an I/O error came from. Errors are tagged on
/// their way up so that the tar parser's error can be attributed.
#[derive(Debug, Clone, Copy)]
enum StreamStage {
    Read,
    Decompress,
}

#[derive(Debug, thiserror::Error)]
#[error("layer stream failed at the {stage:?} stage")]
struct StreamFault {
    stage: StreamStage,
    #[source]
    source: io::Error,
}

fn tag_stream_error(error: io::Error, stage: StreamStage) -> io::Error {
    let already_tagged = error.get_ref().is_some_and(|inner| inner.is::<StreamFault>());
    if already_tagged || error.kind() == io::ErrorKind::Interrupted {
        return error;
    }
    io::Error::new(error.kind(), StreamFault { stage, source: error })
}

/// Attributes an error surfacing from the tar parser to the blob reader, the
/// decoder, or the archive itself.
fn classify_stream_error(error: io::Error, compression: Compression) -> UnpackError {
    if !error.get_ref().is_some_and(|inner| inner.is::<StreamFault>()) {
        return UnpackError::Parse { source: error };
    }
    match error.into_inner().map(|inner| inner.downcast::<StreamFault>()) {
        Some(Ok(fault)) => match fault.stage {
            StreamStage::Read => UnpackError::Read { source: fault.source },
            StreamStage::Decompress => UnpackError::Decompress { compression, source: fault.source },
        },
        Some(Err(inner)) => UnpackError::Parse { source: io::Error::other(inner) },
        None => UnpackError::Parse { source: io::Error::other("stream error without detail") },
    }
}

/// The caller's blob reader, tagging its errors as read errors.
struct SourceReader<R> {
    inner: R,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|error| tag_stream_error(error, StreamStage::Read))
    }
}

/// The decompressed stream, hashed as it is read (the layer's diff_id).
struct HashingReader<'a> {
    inner: Box<dyn Read + 'a>,
    hasher: Sha256,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf).map_err(|error| tag_stream_error(error, StreamStage::Decompress))?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

/// GNU long-name, long-link and PAX headers waiting for the member they
/// describe.
#[derive(Default)]
struct PendingExtensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl PendingExtensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// What a member is, after the tar type flag.
enum MemberKind {
    File,
    Directory,
    /// With the link text.
    Symlink(Vec<u8>),
    /// With the name of the linked entry, not yet normalised.
    Hardlink(Vec<u8>),
    Device,
    Fifo,
}

/// One archive member with its extension headers applied.
struct Member {
    /// The name as found in the archive (lossy UTF-8), for errors.
    raw_name: String,
    /// The normalised name, for reports and errors once it is valid.
    path: String,
    components: Vec<OsString>,
    kind: MemberKind,
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
    size: u64,
    xattrs: Vec<(OsString, Vec<u8>)>,
    /// `LIBARCHIVE.xattr.*` records (base64-encoded), which we do not decode.
    encoded_xattrs: usize,
}

/// Why a name failed normalisation.
enum NameFault {
    Absolute,
    DotDot,
}

/// Splits a tar name into components: a leading `./`, `.` and empty
/// components disappear; an absolute name or a `..` component is a fault.
fn normalise(raw: &[u8]) -> Result<Vec<OsString>, NameFault> {
    if raw.starts_with(b"/") {
        return Err(NameFault::Absolute);
    }
    let mut components = Vec::new();
    for component in raw.split(|&byte| byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(NameFault::DotDot),
            name => components.push(OsStr::from_bytes(name).to_os_string()),
        }
    }
    Ok(components)
}

/// The relative path of some components, `.` for none.
fn join(components: &[OsString]) -> PathBuf {
    if components.is_empty() {
        return PathBuf::from(".");
    }
    components.iter().collect()
}

fn display(components: &[OsString]) -> String {
    let joined = components.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
}

/// Opens `path` below `root` with `root` as the filesystem root for the
/// resolution: `..` and absolute symlinks cannot leave it, magic links and
/// mount crossings are refused.
fn resolve_in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV,
    );
    let mut attempt = 0;
    loop {
        match openat2(root, path, how) {
            Err(Errno::EAGAIN) if attempt < RESOLVE_RETRIES => attempt += 1,
            result => return result,
        }
    }
}

fn file_type(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// Removes the directory `name` in `parent` and everything below it, without
/// following symlinks: each level is opened `O_NOFOLLOW` through its parent's
/// descriptor, so the walk stays in the tree it started in.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    let directory = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut children = Vec::new();
    {
        let mut listing = Dir::from_fd(dup(&directory)?)?;
        for entry in listing.iter() {
            let name = entry?.file_name().to_bytes().to_vec();
            if !is_dot_or_dot_dot(&name) {
                children.push(OsString::from_vec(name));
            }
        }
    }
    for child in &children {
        let stat = fstatat(&directory, child.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if file_type(&stat) == SFlag::S_IFDIR {
            remove_tree(directory.as_fd(), child)?;
        } else {
            unlinkat(&directory, child.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
        }
    }
    drop(directory);
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

/// What was at a name before an entry replaced it.
enum Existing {
    Nothing,
    Directory,
    Other(FileStat),
}

fn existing(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Existing> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) if file_type(&stat) == SFlag::S_IFDIR => Ok(Existing::Directory),
        Ok(stat) => Ok(Existing::Other(stat)),
        Err(Errno::ENOENT) => Ok(Existing::Nothing),
        Err(error) => Err(error),
    }
}

/// Removes whatever is at `name` (a directory with its whole tree), so the
/// next entry of that name is created fresh: later entries win.
fn remove_existing(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    match existing(parent, name)? {
        Existing::Nothing => Ok(()),
        Existing::Directory => remove_tree(parent, name),
        Existing::Other(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir),
    }
}

/// A directory's mtime, applied once no later entry can disturb it.
struct DirectoryTime {
    inode: u64,
    device: u64,
    mtime: TimeSpec,
}

/// Allowed xattrs: file capabilities (`ping`'s `cap_net_raw`) and the user
/// namespace. Everything else is dropped with a reason.
fn xattr_verdict(name: &OsStr) -> Result<(), &'static str> {
    let name = name.as_bytes();
    if name == b"security.capability" || name.starts_with(b"user.") {
        Ok(())
    } else if name.starts_with(b"trusted.") {
        Err("trusted.* xattr dropped: it would forge overlayfs metadata")
    } else if name.starts_with(b"security.") {
        Err("security.* xattr other than security.capability dropped")
    } else {
        Err("xattr outside security.capability and user.* dropped")
    }
}

fn invalid_data(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

fn parse_pax_number(value: &[u8]) -> io::Result<u64> {
    let text = std::str::from_utf8(value).map_err(invalid_data)?;
    text.parse::<u64>().map_err(invalid_data)
}

/// Parses a PAX `mtime` (`seconds[.fraction]`, possibly negative).
fn parse_pax_time(value: &[u8]) -> io::Result<TimeSpec> {
    let text = std::str::from_utf8(value).map_err(invalid_data)?;
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: i64 = seconds.parse().map_err(invalid_data)?;
    if !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid_data("non-digit in the fractional seconds"));
    }
    let digits: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nanoseconds: i64 = digits.parse().map_err(invalid_data)?;
    // "-1.5" is one and a half seconds before the epoch.
    let seconds = if text.starts_with('-') && nanoseconds > 0 {
        nanoseconds = 1_000_000_000 - nanoseconds;
        seconds - 1
    } else {
        seconds
    };
    Ok(TimeSpec::new(seconds, nanoseconds))
}

fn owner_id(value: u64) -> io::Result<u32> {
    // u32::MAX is (uid_t)-1, which chown reads as "leave unchanged".
    u32::try_from(value).ok().filter(|&id| id != u32::MAX).ok_or_else(|| invalid_data("id out of range"))
}

/// Cuts the trailing NULs GNU tar writes after a long name.
fn trim_nuls(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// The state of one unpack.
struct Unpacker {
    root: OwnedFd,
    limits: UnpackLimits,
    compression: Compression,
    entries: u64,
    file_bytes: u64,
    /// Declared member sizes plus extension headers: what the total cap
    /// counts, so that a huge "directory" cannot make us drain gigabytes.
    budget_used: u64,
    neutralised: Vec<Neutralised>,
    directory_times: BTreeMap<Vec<OsString>, DirectoryTime>,
}

impl Unpacker {
    fn stream_error(&self, error: io::Error) -> UnpackError {
        classify_stream_error(error, self.compression)
    }

    fn neutralise(&mut self, path: &str, reason: &'static str) {
        tracing::warn!(path, reason, "layer entry neutralised");
        self.neutralised.push(Neutralised { path: path.to_owned(), reason });
    }

    fn count_entry(&mut self) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries { limit: self.limits.max_entries });
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64, path: &str) -> Result<(), UnpackError> {
        let total = self.budget_used.saturating_add(bytes);
        if total > self.limits.max_total_bytes {
            return Err(UnpackError::TotalTooLarge {
                path: path.to_owned(),
                limit: self.limits.max_total_bytes,
            });
        }
        self.budget_used = total;
        Ok(())
    }

    fn unpack_entries<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), UnpackError> {
        let entries = archive.entries().map_err(|error| self.stream_error(error))?.raw(true);
        let mut pending = PendingExtensions::default();
        for entry in entries {
            let mut entry = entry.map_err(|error| self.stream_error(error))?;
            let kind = entry.header().entry_type();
            let slot = match kind {
                EntryType::GNULongName => Some(&mut pending.long_name),
                EntryType::GNULongLink => Some(&mut pending.long_link),
                EntryType::XHeader => Some(&mut pending.pax),
                _ => None,
            };
            if let Some(slot) = slot {
                if slot.is_some() {
                    return Err(UnpackError::Malformed {
                        reason: "two extension headers of one kind for the same member",
                    });
                }
                *slot = Some(self.read_extension(&mut entry)?);
                continue;
            }
            self.count_entry()?;
            if kind == EntryType::XGlobalHeader {
                // Global PAX headers only carry defaults we do not use.
                self.read_extension(&mut entry)?;
                continue;
            }
            let member = self.read_member(&entry, std::mem::take(&mut pending))?;
            self.unpack_member(member, &mut entry)?;
        }
        if !pending.is_empty() {
            return Err(UnpackError::Malformed { reason: "extension header without a member" });
        }
        Ok(())
    }

    /// Reads a GNU long-name/long-link or PAX header body, capped.
    fn read_extension<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>, UnpackError> {
        let size = entry.size();
        if size > EXTENSION_HEADER_LIMIT {
            return Err(UnpackError::ExtensionTooLarge { size, limit: EXTENSION_HEADER_LIMIT });
        }
        self.charge(size, "(extension header)")?;
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        entry.read_to_end(&mut body).map_err(|error| self.stream_error(error))?;
        if body.len() as u64 != size {
            return Err(UnpackError::Malformed { reason: "extension header is truncated" });
        }
        Ok(body)
    }

    /// Applies the pending extension headers to a member's header and checks
    /// its name, type, ids and size.
    fn read_member<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        extensions: PendingExtensions,
    ) -> Result<Member, UnpackError> {
        let header = entry.header();
        let mut name = extensions.long_name.map(trim_nuls);
        let mut link = extensions.long_link.map(trim_nuls);
        let (mut uid, mut gid, mut mtime, mut pax_size) = (None, None, None, None);
        let mut xattrs = Vec::new();
        let mut encoded_xattrs = 0;
        let mut sparse = false;
        let header_name = || String::from_utf8_lossy(&header.path_bytes()).into_owned();
        if let Some(pax) = &extensions.pax {
            for record in tar::PaxExtensions::new(pax) {
                let record = record.map_err(|source| UnpackError::Parse { source })?;
                let (key, value) = (record.key_bytes(), record.value_bytes());
                let field_error =
                    |field, source| UnpackError::HeaderField { path: header_name(), field, source };
                match key {
                    b"path" => name = name.or_else(|| Some(value.to_vec())),
                    b"linkpath" => link = link.or_else(|| Some(value.to_vec())),
                    b"uid" => uid = Some(parse_pax_number(value).map_err(|e| field_error("uid", e))?),
                    b"gid" => gid = Some(parse_pax_number(value).map_err(|e| field_error("gid", e))?),
                    b"size" => pax_size = Some(parse_pax_number(value).map_err(|e| field_error("size", e))?),
                    b"mtime" => mtime = Some(parse_pax_time(value).map_err(|e| field_error("mtime", e))?),
                    _ if key.starts_with(b"SCHILY.xattr.") => xattrs.push((
                        OsStr::from_bytes(&key[b"SCHILY.xattr.".len()..]).to_os_string(),
                        value.to_vec(),
                    )),
                    _ if key.starts_with(b"LIBARCHIVE.xattr.") => encoded_xattrs += 1,
                    _ if key.starts_with(b"GNU.sparse.") => sparse = true,
                    _ => {}
                }
            }
        }
        let name = name.unwrap_or_else(|| header.path_bytes().into_owned());
        let raw_name = String::from_utf8_lossy(&name).into_owned();
        let field_error = |field, source| UnpackError::HeaderField { path: raw_name.clone(), field, source };

        let link_text =
            || match link.clone().or_else(|| header.link_name_bytes().map(|bytes| bytes.into_owned())) {
                Some(link) if !link.is_empty() && !link.contains(&0) => Ok(link),
                _ => Err(UnpackError::InvalidPath {
                    path: raw_name.clone(),
                    reason: "empty link target or NUL byte in it",
                }),
            };
        let type_flag = header.as_old().linkflag[0];
        let kind = match type_flag {
            // An old-style regular file whose name ends in '/' is a directory.
            b'\0' if name.ends_with(b"/") => MemberKind::Directory,
            b'\0' | b'0' | b'7' if sparse => {
                return Err(UnpackError::UnsupportedEntry { path: raw_name, type_flag: 'S' })
            }
            b'\0' | b'0' | b'7' => MemberKind::File,
            b'1' => MemberKind::Hardlink(link_text()?),
            b'2' => MemberKind::Symlink(link_text()?),
            b'3' | b'4' => MemberKind::Device,
            b'5' => MemberKind::Directory,
            b'6' => MemberKind::Fifo,
            other => {
                return Err(UnpackError::UnsupportedEntry { path: raw_name, type_flag: char::from(other) })
            }
        };

        if name.contains(&0) {
            return Err(UnpackError::InvalidPath { path: raw_name, reason: "NUL byte in the name" });
        }
        let components = match normalise(&name) {
            Ok(components) => components,
            Err(NameFault::Absolute) => return Err(UnpackError::AbsolutePath { path: raw_name }),
            Err(NameFault::DotDot) => return Err(UnpackError::PathEscape { path: raw_name }),
        };
        if components.is_empty() && !matches!(kind, MemberKind::Directory) {
            return Err(UnpackError::InvalidPath {
                path: raw_name,
                reason: "only a directory may name the layer root",
            });
        }
        let uid = match uid {
            Some(uid) => uid,
            None => header.uid().map_err(|e| field_error("uid", e))?,
        };
        let gid = match gid {
            Some(gid) => gid,
            None => header.gid().map_err(|e| field_error("gid", e))?,
        };
        let mtime = match mtime {
            Some(mtime) => mtime,
            None => {
                let seconds = header.mtime().map_err(|e| field_error("mtime", e))?;
                TimeSpec::new(i64::try_from(seconds).unwrap_or(i64::MAX), 0)
            }
        };
        let mode = header.mode().map_err(|e| field_error("mode", e))?;
        let path = display(&components);
        let size = entry.size();
        if let Some(pax_size) = pax_size {
            // In raw mode the tar crate positions the stream by the header's
            // size field; a PAX size that disagrees would desynchronise it.
            if pax_size > self.limits.max_file_bytes {
                return Err(UnpackError::FileTooLarge {
                    path,
                    size: pax_size,
                    limit: self.limits.max_file_bytes,
                });
            }
            if pax_size != size {
                return Err(UnpackError::Malformed { reason: "PAX size disagrees with the header size" });
            }
        }
        Ok(Member {
            uid: Uid::from_raw(owner_id(uid).map_err(|e| field_error("uid", e))?),
            gid: Gid::from_raw(owner_id(gid).map_err(|e| field_error("gid", e))?),
            mode: Mode::from_bits_truncate(mode & 0o7777),
            raw_name,
            path,
            components,
            kind,
            mtime,
            size,
            xattrs,
            encoded_xattrs,
        })
    }

    fn unpack_member<R: Read>(
        &mut self,
        member: Member,
        data: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        if member.size > self.limits.max_file_bytes {
            return Err(UnpackError::FileTooLarge {
                path: member.path,
                size: member.size,
                limit: self.limits.max_file_bytes,
            });
        }
        self.charge(member.size, &member.path)?;

        let Some((name, parents)) = member.components.split_last() else {
            return self.unpack_root_directory(&member);
        };
        let name = name.clone();
        let parents = parents.to_vec();

        if member.components.iter().any(|c| c.as_bytes().starts_with(WHITEOUT_META_PREFIX))
            && name.as_bytes() != WHITEOUT_OPAQUE
        {
            self.neutralise(&member.path, "AUFS whiteout metadata skipped");
            return Ok(());
        }
        if parents.iter().any(|c| c.as_bytes().starts_with(WHITEOUT_PREFIX)) {
            return Err(UnpackError::WhiteoutAsDirectory { path: member.raw_name });
        }
        if name.as_bytes() == WHITEOUT_OPAQUE {
            return self.mark_opaque(&member, &parents);
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(UnpackError::WhiteoutEscape { path: member.raw_name });
            }
            return self.whiteout(&member, &parents, OsStr::from_bytes(hidden));
        }
        if matches!(member.kind, MemberKind::Device) {
            self.neutralise(&member.path, "device node skipped");
            return Ok(());
        }

        let parent = self.open_directory(&parents, OFlag::O_PATH, &member.path)?;
        match &member.kind {
            MemberKind::File => self.unpack_file(&member, parent.as_fd(), &name, data),
            MemberKind::Directory => self.unpack_directory(&member, parent.as_fd(), &name),
            MemberKind::Symlink(link) => self.unpack_symlink(&member, link, parent.as_fd(), &name),
            MemberKind::Hardlink(link) => self.unpack_hardlink(&member, link, parent.as_fd(), &name),
            MemberKind::Fifo => self.unpack_fifo(&member, parent.as_fd(), &name),
            // Skipped above, before any directory was created for it.
            MemberKind::Device => Ok(()),
        }
    }

    /// Opens the directory `components` inside the root, creating missing
    /// directories (mode 0755, like Docker) on the way.
    fn open_directory(
        &self,
        components: &[OsString],
        flags: OFlag,
        path: &str,
    ) -> Result<OwnedFd, UnpackError> {
        let flags = flags | OFlag::O_DIRECTORY;
        let resolve_error = |source| UnpackError::ResolveParent { path: path.to_owned(), source };
        match resolve_in_root(self.root.as_fd(), &join(components), flags) {
            Err(Errno::ENOENT) => {}
            result => return result.map_err(resolve_error),
        }
        for depth in 1..=components.len() {
            let prefix = &components[..depth];
            match resolve_in_root(self.root.as_fd(), &join(prefix), OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(error) => return Err(resolve_error(error)),
            }
            let parent = resolve_in_root(
                self.root.as_fd(),
                &join(&components[..depth - 1]),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
            )
            .map_err(resolve_error)?;
            let name = &components[depth - 1];
            match mkdirat(&parent, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                // EEXIST: a dangling symlink; the final resolution reports it.
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(error) => return Err(resolve_error(error)),
            }
        }
        resolve_in_root(self.root.as_fd(), &join(components), flags).map_err(resolve_error)
    }

    fn set_owner_and_mode(&self, fd: BorrowedFd<'_>, member: &Member) -> Result<(), UnpackError> {
        let metadata_error =
            |step, source| UnpackError::SetMetadata { path: member.path.clone(), step, source };
        // chown clears setuid/setgid, so the mode comes after it.
        fchown(fd, Some(member.uid), Some(member.gid)).map_err(|e| metadata_error("owner", e))?;
        fchmod(fd, member.mode).map_err(|e| metadata_error("mode", e))
    }

    fn set_times(&self, fd: BorrowedFd<'_>, member: &Member) -> Result<(), UnpackError> {
        futimens(fd, &member.mtime, &member.mtime).map_err(|source| UnpackError::SetMetadata {
            path: member.path.clone(),
            step: "mtime",
            source,
        })
    }

    /// Applies the allowed xattrs through a descriptor of the object (after
    /// chown, which clears `security.capability`), and records the rest.
    fn apply_xattrs(&mut self, file: Option<&File>, member: &Member) -> Result<(), UnpackError> {
        for _ in 0..member.encoded_xattrs {
            self.neutralise(&member.path, "libarchive-encoded xattr dropped");
        }
        for (name, value) in &member.xattrs {
            if let Err(reason) = xattr_verdict(name) {
                tracing::warn!(path = member.path, xattr = ?name, "xattr dropped");
                self.neutralise(&member.path, reason);
                continue;
            }
            let Some(file) = file else {
                self.neutralise(&member.path, "xattr on an entry that is not a file or directory dropped");
                continue;
            };
            match file.set_xattr(name, value) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.neutralise(&member.path, "xattr not supported by the filesystem");
                }
                Err(source) => {
                    return Err(UnpackError::SetXattr {
                        path: member.path.clone(),
                        name: name.to_string_lossy().into_owned(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn unpack_file<R: Read>(
        &mut self,
        member: &Member,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        data: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        remove_existing(parent, name)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?;
        let fd = openat(
            parent,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|source| UnpackError::Create { path: member.path.clone(), source })?;
        let mut file = File::from(fd);
        let mut buffer = vec![0u8; 64 * 1024];
        let mut written: u64 = 0;
        loop {
            let read = match data.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(self.stream_error(error)),
            };
            written += read as u64;
            if written > self.limits.max_file_bytes {
                return Err(UnpackError::FileTooLarge {
                    path: member.path.clone(),
                    size: written,
                    limit: self.limits.max_file_bytes,
                });
            }
            file.write_all(&buffer[..read])
                .map_err(|source| UnpackError::Write { path: member.path.clone(), source })?;
        }
        if written != member.size {
            return Err(UnpackError::Truncated {
                path: member.path.clone(),
                expected: member.size,
                actual: written,
            });
        }
        self.file_bytes += written;
        self.set_owner_and_mode(file.as_fd(), member)?;
        self.apply_xattrs(Some(&file), member)?;
        self.set_times(file.as_fd(), member)
    }

    fn unpack_directory(
        &mut self,
        member: &Member,
        parent: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<(), UnpackError> {
        let create_error = |source| UnpackError::Create { path: member.path.clone(), source };
        let replace_error = |source| UnpackError::Replace { path: member.path.clone(), source };
        // An existing directory stays (with its children); anything else
        // at that name is replaced.
        match existing(parent, name).map_err(replace_error)? {
            Existing::Directory => {}
            Existing::Other(_) => {
                unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(replace_error)?;
                mkdirat(parent, name, Mode::from_bits_truncate(0o700)).map_err(create_error)?;
            }
            Existing::Nothing => {
                mkdirat(parent, name, Mode::from_bits_truncate(0o700)).map_err(create_error)?
            }
        }
        let fd = openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(create_error)?;
        self.finish_directory(File::from(fd), member)
    }

    /// A directory entry naming the layer root (`./`) sets the root's
    /// metadata.
    fn unpack_root_directory(&mut self, member: &Member) -> Result<(), UnpackError> {
        let fd =
            openat(&self.root, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|source| UnpackError::Create { path: member.path.clone(), source })?;
        self.finish_directory(File::from(fd), member)
    }

    fn finish_directory(&mut self, directory: File, member: &Member) -> Result<(), UnpackError> {
        self.set_owner_and_mode(directory.as_fd(), member)?;
        self.apply_xattrs(Some(&directory), member)?;
        let stat = fstat(&directory).map_err(|source| UnpackError::SetMetadata {
            path: member.path.clone(),
            step: "mtime",
            source,
        })?;
        // Later entries change the directory's mtime; it is set at the end.
        self.directory_times.insert(
            member.components.clone(),
            DirectoryTime { inode: stat.st_ino, device: stat.st_dev, mtime: member.mtime },
        );
        Ok(())
    }

    fn unpack_symlink(
        &mut self,
        member: &Member,
        link: &[u8],
        parent: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<(), UnpackError> {
        remove_existing(parent, name)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?;
        // The link text is stored as is: it is only ever resolved inside the
        // container, or here through RESOLVE_IN_ROOT.
        symlinkat(OsStr::from_bytes(link), parent, name)
            .map_err(|source| UnpackError::Create { path: member.path.clone(), source })?;
        let metadata_error =
            |step, source| UnpackError::SetMetadata { path: member.path.clone(), step, source };
        fchownat(parent, name, Some(member.uid), Some(member.gid), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| metadata_error("owner", e))?;
        self.apply_xattrs(None, member)?;
        utimensat(parent, name, &member.mtime, &member.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| metadata_error("mtime", e))
    }

    /// A hardlink gets the inode of an entry of this layer; the inode keeps
    /// the metadata of the entry that created it.
    fn unpack_hardlink(
        &mut self,
        member: &Member,
        link: &[u8],
        parent: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<(), UnpackError> {
        let target = String::from_utf8_lossy(link).into_owned();
        let escape = || UnpackError::HardlinkEscape { path: member.path.clone(), target: target.clone() };
        let source_components = normalise(link).map_err(|_| escape())?;
        let Some((source_name, source_parents)) = source_components.split_last() else {
            return Err(escape());
        };
        let source_error = |source| UnpackError::HardlinkSource {
            path: member.path.clone(),
            target: target.clone(),
            source,
        };
        let source_parent =
            resolve_in_root(self.root.as_fd(), &join(source_parents), OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(source_error)?;
        let source = fstatat(&source_parent, source_name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(source_error)?;
        match existing(parent, name)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?
        {
            // Already this inode (a repeated entry, or a link to itself).
            Existing::Other(stat) if stat.st_ino == source.st_ino && stat.st_dev == source.st_dev => {
                return Ok(())
            }
            _ => {}
        }
        remove_existing(parent, name)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?;
        linkat(&source_parent, source_name.as_os_str(), parent, name, AtFlags::empty())
            .map_err(|source| UnpackError::Create { path: member.path.clone(), source })?;
        self.apply_xattrs(None, member)
    }

    /// FIFOs are harmless: created, then opened non-blocking to set their
    /// metadata through a descriptor.
    fn unpack_fifo(
        &mut self,
        member: &Member,
        parent: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<(), UnpackError> {
        let create_error = |source| UnpackError::Create { path: member.path.clone(), source };
        remove_existing(parent, name)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?;
        mknodat(parent, name, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0).map_err(create_error)?;
        let fd = openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(create_error)?;
        let stat = fstat(&fd).map_err(create_error)?;
        if file_type(&stat) != SFlag::S_IFIFO {
            return Err(create_error(Errno::EEXIST));
        }
        self.set_owner_and_mode(fd.as_fd(), member)?;
        self.apply_xattrs(None, member)?;
        self.set_times(fd.as_fd(), member)
    }

    /// `dir/.wh.name` becomes the overlayfs whiteout for `dir/name`: a 0:0
    /// character device.
    fn whiteout(&mut self, member: &Member, parents: &[OsString], hidden: &OsStr) -> Result<(), UnpackError> {
        let parent = self.open_directory(parents, OFlag::O_PATH, &member.path)?;
        remove_existing(parent.as_fd(), hidden)
            .map_err(|source| UnpackError::Replace { path: member.path.clone(), source })?;
        mknodat(&parent, hidden, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|source| UnpackError::Create { path: member.path.clone(), source })
    }

    /// `dir/.wh..wh..opq` marks `dir` opaque: lower layers' entries of `dir`
    /// are hidden, this layer's stay.
    fn mark_opaque(&mut self, member: &Member, parents: &[OsString]) -> Result<(), UnpackError> {
        let directory = File::from(self.open_directory(parents, OFlag::O_RDONLY, &member.path)?);
        directory.set_xattr(OVERLAY_OPAQUE_XATTR, b"y").map_err(|source| UnpackError::SetXattr {
            path: member.path.clone(),
            name: OVERLAY_OPAQUE_XATTR.to_owned(),
            source,
        })
    }

    /// Sets the directories' mtimes, deepest first. A directory that a later
    /// entry replaced (another inode, or no longer a directory) is skipped.
    fn apply_directory_times(&self) -> Result<(), UnpackError> {
        for (components, time) in self.directory_times.iter().rev() {
            let path = display(components);
            let directory = match components.split_last() {
                None => openat(
                    &self.root,
                    ".",
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ),
                Some((name, parents)) => {
                    let parent = match resolve_in_root(
                        self.root.as_fd(),
                        &join(parents),
                        OFlag::O_PATH | OFlag::O_DIRECTORY,
                    ) {
                        Ok(parent) => parent,
                        // A later entry replaced a parent: gone, not a
                        // directory, or a symlink loop (`a/a/` then `a -> a/a`).
                        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                        Err(source) => return Err(UnpackError::ResolveParent { path, source }),
                    };
                    openat(
                        &parent,
                        name.as_os_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                }
            };
            let directory = match directory {
                Ok(directory) => directory,
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                Err(source) => return Err(UnpackError::SetMetadata { path, step: "mtime", source }),
            };
            let stat = fstat(&directory).map_err(|source| UnpackError::SetMetadata {
                path: path.clone(),
                step: "mtime",
                source,
            })?;
            if stat.st_ino != time.inode || stat.st_dev != time.device {
                continue;
            }
            futimens(&directory, &time.mtime, &time.mtime).map_err(|source| UnpackError::SetMetadata {
                path,
                step: "mtime",
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::process::Command;

    const MTIME: u64 = 1_600_000_000;

    /// A layer built header by header, so names the tar crate's builder would
    /// refuse (`..`, absolute) can be written.
    struct Layer {
        builder: tar::Builder<Vec<u8>>,
    }

    fn raw_header(name: &str, kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        let name = name.as_bytes();
        assert!(name.len() <= 100, "use a long-name header for {name:?}");
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header
    }

    fn set_link(header: &mut tar::Header, target: &str) {
        let target = target.as_bytes();
        assert!(target.len() <= 100);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    }

    /// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let base = key.len() + value.len() + 3;
        let mut length = base + 1;
        while base + length.to_string().len() != length {
            length += 1;
        }
        let mut record = format!("{length} {key}=").into_bytes();
        record.extend_from_slice(value);
        record.push(b'\n');
        record
    }

    impl Layer {
        fn new() -> Self {
            Layer { builder: tar::Builder::new(Vec::new()) }
        }

        fn append(&mut self, mut header: tar::Header, data: &[u8]) -> &mut Self {
            header.set_cksum();
            self.builder.append(&header, data).unwrap();
            self
        }

        fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
            self.append(raw_header(name, EntryType::Directory, 0, mode), &[])
        }

        fn file(&mut self, name: &str, content: &[u8]) -> &mut Self {
            self.file_owned(name, content, 0o644, 0, 0)
        }

        fn file_owned(&mut self, name: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
            let mut header = raw_header(name, EntryType::Regular, content.len() as u64, mode);
            header.set_uid(uid);
            header.set_gid(gid);
            self.append(header, content)
        }

        fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
            let mut header = raw_header(name, EntryType::Symlink, 0, 0o777);
            set_link(&mut header, target);
            self.append(header, &[])
        }

        fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
            let mut header = raw_header(name, EntryType::Link, 0, 0o644);
            set_link(&mut header, target);
            self.append(header, &[])
        }

        fn special(&mut self, name: &str, kind: EntryType) -> &mut Self {
            let mut header = raw_header(name, kind, 0, 0o666);
            header.set_device_major(8).unwrap();
            header.set_device_minor(0).unwrap();
            self.append(header, &[])
        }

        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            let body: Vec<u8> = records.iter().flat_map(|(key, value)| pax_record(key, value)).collect();
            self.append(raw_header("PaxHeader", EntryType::XHeader, body.len() as u64, 0o644), &body)
        }

        fn finish(&mut self) -> Vec<u8> {
            std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new())).into_inner().unwrap()
        }
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(tar).unwrap();
        encoder.finish().unwrap()
    }

    fn zstd(tar: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(tar, 3).unwrap()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// A base directory holding the unpack target and, beside it, a canary
    /// tree that no layer may touch.
    struct Sandbox {
        base: tempfile::TempDir,
        target: PathBuf,
        canary: PathBuf,
    }

    impl Sandbox {
        fn new() -> Self {
            let base = tempfile::tempdir().unwrap();
            let target = base.path().join("target");
            let canary = base.path().join("canary");
            std::fs::create_dir(&target).unwrap();
            std::fs::create_dir_all(canary.join("sub")).unwrap();
            std::fs::write(canary.join("secret"), b"host secret").unwrap();
            std::fs::write(canary.join("sub/file"), b"host file").unwrap();
            Sandbox { base, target, canary }
        }

        fn canary(&self) -> &str {
            self.canary.to_str().unwrap()
        }

        /// Hash of everything outside the target: the base directory minus
        /// the target, and /etc/passwd's metadata.
        fn outside(&self) -> String {
            let mut listing = String::new();
            describe_tree(self.base.path(), self.base.path(), Some(&self.target), false, &mut listing);
            let passwd = std::fs::symlink_metadata("/etc/passwd").unwrap();
            listing.push_str(&format!(
                "passwd {} {:o} {} {}\n",
                passwd.nlink(),
                passwd.mode(),
                passwd.uid(),
                passwd.len()
            ));
            sha256_hex(listing.as_bytes())
        }

        fn unpack(&self, layer: &[u8], limits: &UnpackLimits) -> Result<UnpackReport, UnpackError> {
            unpack_layer(layer, Compression::None, &self.target, limits)
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.target.join(relative)
        }
    }

    /// Appends a line per object below `dir` (path, type, mode, owner,
    /// content or link text, and optionally mtime), without following
    /// symlinks.
    fn describe_tree(root: &Path, dir: &Path, skip: Option<&Path>, mtimes: bool, out: &mut String) {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if Some(path.as_path()) == skip {
                continue;
            }
            let metadata = std::fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            let kind = metadata.file_type();
            let detail = if kind.is_symlink() {
                std::fs::read_link(&path).unwrap().display().to_string()
            } else if kind.is_file() {
                sha256_hex(&std::fs::read(&path).unwrap())
            } else if kind.is_char_device() || kind.is_block_device() {
                format!("dev {}", metadata.rdev())
            } else {
                String::new()
            };
            let mtime = if mtimes { metadata.mtime().to_string() } else { String::new() };
            out.push_str(&format!(
                "{relative} {:o} {}:{} {detail} {mtime}\n",
                metadata.mode(),
                metadata.uid(),
                metadata.gid()
            ));
            if kind.is_dir() {
                describe_tree(root, &path, skip, mtimes, out);
            }
        }
    }

    fn tree(dir: &Path) -> String {
        let mut out = String::new();
        describe_tree(dir, dir, None, true, &mut out);
        out
    }

    /// Unpacks a hostile layer and checks it fails as expected without
    /// changing anything outside the target.
    fn assert_rejected(layer: &[u8], expected: impl Fn(&UnpackError) -> bool) -> Sandbox {
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let result = sandbox.unpack(layer, &UnpackLimits::default());
        match &result {
            Err(error) => assert!(expected(error), "unexpected error: {error:?}"),
            Ok(report) => panic!("hostile layer unpacked: {report:?}"),
        }
        assert_eq!(before, sandbox.outside(), "the host changed");
        sandbox
    }

    fn capability_v2_net_raw() -> Vec<u8> {
        // struct vfs_cap_data, revision 2, effective, permitted = CAP_NET_RAW.
        let mut value = Vec::new();
        value.extend_from_slice(&0x0200_0001u32.to_le_bytes());
        value.extend_from_slice(&(1u32 << 13).to_le_bytes());
        value.extend_from_slice(&0u32.to_le_bytes());
        value.extend_from_slice(&0u32.to_le_bytes());
        value.extend_from_slice(&0u32.to_le_bytes());
        value
    }

    fn normal_layer() -> Vec<u8> {
        let mut layer = Layer::new();
        layer
            .dir("./", 0o755)
            .dir("etc/", 0o750)
            .file_owned("etc/config", b"hello", 0o640, 1000, 1001)
            .dir("bin/", 0o755)
            .file_owned("bin/tool", b"#!/bin/sh\necho tool\n", 0o755, 0, 0)
            .file_owned("bin/su", b"setuid", 0o4750, 1000, 1000)
            .symlink("bin/tool-link", "tool")
            .symlink("bin/absolute-link", "/usr/bin/env")
            .hardlink("bin/tool-hardlink", "bin/tool")
            .dir("var/", 0o1777)
            .special("var/fifo", EntryType::Fifo)
            .pax(&[
                ("SCHILY.xattr.security.capability", &capability_v2_net_raw()),
                ("SCHILY.xattr.user.origin", b"layer"),
            ])
            .file_owned("bin/ping", b"ping", 0o755, 0, 0);
        // A name over 100 bytes travels in a GNU long-name header, and its
        // parent directories are not in the layer.
        let long_name = format!("deep/{}/file", "x".repeat(150));
        let mut header = raw_header("", EntryType::Regular, 4, 0o600);
        layer.builder.append_data(&mut header, &long_name, &b"deep"[..]).unwrap();
        layer.finish()
    }

    #[test]
    fn normal_layer_is_reproduced() {
        let tar = normal_layer();
        let sandbox = Sandbox::new();
        let report = sandbox.unpack(&tar, &UnpackLimits::default()).unwrap();

        assert_eq!(report.diff_id, format!("sha256:{}", sha256_hex(&tar)));
        assert_eq!(report.entries, 13);
        assert!(report.neutralised.is_empty(), "{:?}", report.neutralised);

        let config = std::fs::metadata(sandbox.path("etc/config")).unwrap();
        assert_eq!(std::fs::read(sandbox.path("etc/config")).unwrap(), b"hello");
        assert_eq!((config.mode() & 0o7777, config.uid(), config.gid()), (0o640, 1000, 1001));
        assert_eq!(config.mtime(), MTIME as i64);

        // setuid survives because the mode is applied after chown.
        let su = std::fs::metadata(sandbox.path("bin/su")).unwrap();
        assert_eq!((su.mode() & 0o7777, su.uid()), (0o4750, 1000));

        assert_eq!(std::fs::read_link(sandbox.path("bin/tool-link")).unwrap(), Path::new("tool"));
        assert_eq!(std::fs::read_link(sandbox.path("bin/absolute-link")).unwrap(), Path::new("/usr/bin/env"));
        let tool = std::fs::metadata(sandbox.path("bin/tool")).unwrap();
        let hardlink = std::fs::metadata(sandbox.path("bin/tool-hardlink")).unwrap();
        assert_eq!((tool.ino(), tool.nlink()), (hardlink.ino(), 2));

        let fifo = std::fs::symlink_metadata(sandbox.path("var/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o666);
        assert_eq!(std::fs::metadata(sandbox.path("var")).unwrap().mode() & 0o7777, 0o1777);

        let ping = sandbox.path("bin/ping");
        assert_eq!(xattr::get(&ping, "security.capability").unwrap(), Some(capability_v2_net_raw()));
        assert_eq!(xattr::get(&ping, "user.origin").unwrap(), Some(b"layer".to_vec()));

        let deep = sandbox.path(&format!("deep/{}/file", "x".repeat(150)));
        assert_eq!(std::fs::read(deep).unwrap(), b"deep");

        // Directory mtimes are applied after their children were created.
        for dir in ["", "etc", "bin", "var"] {
            assert_eq!(std::fs::metadata(sandbox.path(dir)).unwrap().mtime(), MTIME as i64, "{dir}");
        }
        assert_eq!(std::fs::metadata(sandbox.path("")).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn compressed_layers_give_the_same_tree_and_diff_id() {
        let tar = normal_layer();
        let expected_diff_id = format!("sha256:{}", sha256_hex(&tar));
        let mut trees = Vec::new();
        for (compression, blob) in [
            (Compression::None, tar.clone()),
            (Compression::Gzip, gzip(&tar)),
            (Compression::Zstd, zstd(&tar)),
        ] {
            assert_eq!(Compression::sniff(&blob), compression);
            let sandbox = Sandbox::new();
            let report =
                unpack_layer(blob.as_slice(), compression, &sandbox.target, &UnpackLimits::default())
                    .unwrap();
            assert_eq!(report.diff_id, expected_diff_id, "{compression:?}");
            // The layer has no entries for `deep` and its child: they are
            // made when the long name is unpacked and keep the time they
            // were made at, which differs between unpacks that straddle a
            // second. Every other mtime comes from the layer and is compared.
            let implicit = ["deep".to_string(), format!("deep/{}", "x".repeat(150))];
            let listing = tree(&sandbox.target)
                .lines()
                .map(|line| {
                    let path = line.split(' ').next().unwrap_or_default();
                    match line.rsplit_once(' ') {
                        Some((rest, _mtime)) if implicit.iter().any(|dir| dir == path) => {
                            format!("{rest} -\n")
                        }
                        _ => format!("{line}\n"),
                    }
                })
                .collect::<String>();
            trees.push(listing);
        }
        assert_eq!(trees[0], trees[1]);
        assert_eq!(trees[0], trees[2]);
    }

    #[test]
    fn diff_id_covers_trailing_padding() {
        let mut tar = Layer::new().file("a", b"a").finish();
        tar.extend_from_slice(&[0u8; 10240]);
        let sandbox = Sandbox::new();
        let report = sandbox.unpack(&tar, &UnpackLimits::default()).unwrap();
        assert_eq!(report.diff_id, format!("sha256:{}", sha256_hex(&tar)));
    }

    #[test]
    fn trailing_data_over_the_limit_is_an_error() {
        let mut tar = Layer::new().file("a", b"a").finish();
        tar.resize(tar.len() + TRAILING_DATA_LIMIT as usize + 1024, 0);
        let sandbox = Sandbox::new();
        let error =
            unpack_layer(gzip(&tar).as_slice(), Compression::Gzip, &sandbox.target, &UnpackLimits::default())
                .unwrap_err();
        assert!(matches!(error, UnpackError::TrailingData { .. }), "{error:?}");
    }

    #[test]
    fn media_types_and_magic_bytes() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.config.v1+json"), None);
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 0x08]), Compression::Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0x00]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
        assert_eq!(Compression::sniff(&[0x1f]), Compression::None);
    }

    #[test]
    fn stream_failures_name_their_stage() {
        let sandbox = Sandbox::new();
        let tar = Layer::new().file("a", b"a").finish();
        let mut corrupt = gzip(&tar);
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        corrupt.truncate(corrupt.len() - 4);
        let error =
            unpack_layer(corrupt.as_slice(), Compression::Gzip, &sandbox.target, &UnpackLimits::default())
                .unwrap_err();
        assert!(matches!(error, UnpackError::Decompress { compression: Compression::Gzip, .. }), "{error:?}");

        struct FailingReader;
        impl Read for FailingReader {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "registry went away"))
            }
        }
        let sandbox = Sandbox::new();
        let error = unpack_layer(FailingReader, Compression::Zstd, &sandbox.target, &UnpackLimits::default())
            .unwrap_err();
        assert!(
            matches!(&error, UnpackError::Read { source } if source.kind() == io::ErrorKind::ConnectionReset)
        );

        let sandbox = Sandbox::new();
        let error = sandbox.unpack(&tar[..700], &UnpackLimits::default()).unwrap_err();
        assert!(matches!(error, UnpackError::Parse { .. } | UnpackError::Truncated { .. }), "{error:?}");
    }

    #[test]
    fn target_must_be_an_empty_real_directory() {
        let sandbox = Sandbox::new();
        std::fs::write(sandbox.path("leftover"), b"").unwrap();
        let error = sandbox.unpack(&Layer::new().finish(), &UnpackLimits::default()).unwrap_err();
        assert!(matches!(error, UnpackError::TargetNotEmpty { .. }), "{error:?}");

        let link = sandbox.base.path().join("link");
        std::os::unix::fs::symlink(&sandbox.canary, &link).unwrap();
        let error =
            unpack_layer(&Layer::new().finish()[..], Compression::None, &link, &UnpackLimits::default())
                .unwrap_err();
        assert!(
            matches!(error, UnpackError::OpenTarget { source: Errno::ENOTDIR | Errno::ELOOP, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn dot_dot_names_are_rejected() {
        assert_rejected(
            &Layer::new().file("../escape", b"x").finish(),
            |e| matches!(e, UnpackError::PathEscape { path } if path == "../escape"),
        );
        assert_rejected(
            &Layer::new().dir("a/", 0o755).file("a/../../x", b"x").finish(),
            |e| matches!(e, UnpackError::PathEscape { path } if path == "a/../../x"),
        );
        assert_rejected(&Layer::new().dir("../../", 0o777).finish(), |e| {
            matches!(e, UnpackError::PathEscape { .. })
        });
    }

    #[test]
    fn absolute_names_are_rejected() {
        let sandbox = Sandbox::new();
        let name = format!("{}/abs-pwned", sandbox.canary());
        assert_rejected(
            &Layer::new().file(&name, b"x").finish(),
            |e| matches!(e, UnpackError::AbsolutePath { path } if *path == name),
        );
        assert_rejected(&Layer::new().file("/abs/path", b"x").finish(), |e| {
            matches!(e, UnpackError::AbsolutePath { .. })
        });
        assert!(!sandbox.canary.join("abs-pwned").exists());
    }

    #[test]
    fn symlink_planted_by_an_earlier_entry_resolves_inside_the_target() {
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let layer = Layer::new().symlink("evil", sandbox.canary()).file("evil/pwned", b"pwned").finish();
        let error = sandbox.unpack(&layer, &UnpackLimits::default()).unwrap_err();
        assert!(
            matches!(&error, UnpackError::ResolveParent { path, .. } if path == "evil/pwned"),
            "{error:?}"
        );
        assert_eq!(before, sandbox.outside());
        assert!(!sandbox.canary.join("pwned").exists());

        // The same link target, when it exists inside the layer, is where
        // the write lands.
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let inside = sandbox.canary().trim_start_matches('/').to_owned();
        let mut layer = Layer::new();
        let mut prefix = String::new();
        for component in inside.split('/') {
            prefix = format!("{prefix}{component}/");
            layer.dir(&prefix, 0o755);
        }
        let layer = layer.symlink("evil", sandbox.canary()).file("evil/pwned", b"pwned").finish();
        sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(before, sandbox.outside());
        assert_eq!(std::fs::read(sandbox.path(&format!("{inside}/pwned"))).unwrap(), b"pwned");
    }

    #[test]
    fn dot_dot_symlink_chains_are_clamped_to_the_target() {
        // Without in-root resolution each of these lands in the sandbox
        // base, beside the target, where the snapshot sees it.
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let layer = Layer::new()
            .symlink("up", "..")
            .file("up/pwned", b"1")
            .dir("a/", 0o755)
            .dir("a/b/", 0o755)
            .symlink("a/b/c", "../../..")
            .file("a/b/c/canary/secret", b"2")
            .symlink("a/b/e", "c/canary")
            .file("a/b/e/pwned3", b"3")
            .finish();
        sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(before, sandbox.outside());
        assert_eq!(std::fs::read(sandbox.path("pwned")).unwrap(), b"1");
        assert_eq!(std::fs::read(sandbox.path("canary/secret")).unwrap(), b"2");
        assert_eq!(std::fs::read(sandbox.path("canary/pwned3")).unwrap(), b"3");
        assert_eq!(std::fs::read(sandbox.canary.join("secret")).unwrap(), b"host secret");
    }

    #[test]
    fn magic_links_are_not_followed() {
        let sandbox = Sandbox::new();
        let through_proc = format!("/proc/self/root{}", sandbox.base.path().display());
        let layer = Layer::new().symlink("proc-root", &through_proc).file("proc-root/pwned", b"x").finish();
        assert_rejected(&layer, |e| matches!(e, UnpackError::ResolveParent { .. }));
    }

    #[test]
    fn hardlinks_cannot_leave_the_layer() {
        assert_rejected(
            &Layer::new().hardlink("passwd", "/etc/passwd").finish(),
            |e| matches!(e, UnpackError::HardlinkEscape { path, target } if path == "passwd" && target == "/etc/passwd"),
        );
        assert_rejected(
            &Layer::new().hardlink("x", "../x").finish(),
            |e| matches!(e, UnpackError::HardlinkEscape { target, .. } if target == "../x"),
        );
        assert_rejected(&Layer::new().file("a", b"a").hardlink("x", "./").finish(), |e| {
            matches!(e, UnpackError::HardlinkEscape { .. })
        });
        let sandbox = Sandbox::new();
        let layer = Layer::new().symlink("evil", sandbox.canary()).hardlink("stolen", "evil/secret").finish();
        assert_rejected(&layer, |e| matches!(e, UnpackError::HardlinkSource { source: Errno::ENOENT, .. }));
        assert_rejected(&Layer::new().hardlink("x", "missing").finish(), |e| {
            matches!(e, UnpackError::HardlinkSource { .. })
        });
    }

    #[test]
    fn hardlink_to_a_symlink_links_the_symlink_itself() {
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let secret = format!("{}/secret", sandbox.canary());
        let layer = Layer::new().symlink("s", &secret).hardlink("h", "s").finish();
        sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        let linked = std::fs::symlink_metadata(sandbox.path("h")).unwrap();
        assert!(linked.file_type().is_symlink());
        assert_eq!(linked.nlink(), 2);
        assert_eq!(before, sandbox.outside());
    }

    #[test]
    fn whiteouts_cannot_name_outside_their_directory() {
        assert_rejected(&Layer::new().file(".wh.../x", b"").finish(), |e| {
            matches!(e, UnpackError::WhiteoutAsDirectory { .. })
        });
        assert_rejected(&Layer::new().file("../.wh.x", b"").finish(), |e| {
            matches!(e, UnpackError::PathEscape { .. })
        });
        assert_rejected(&Layer::new().file(".wh...", b"").finish(), |e| {
            matches!(e, UnpackError::WhiteoutEscape { .. })
        });
        assert_rejected(&Layer::new().dir("a/", 0o755).file("a/.wh..", b"").finish(), |e| {
            matches!(e, UnpackError::WhiteoutEscape { .. })
        });
        // A bare ".wh." would name the directory itself.
        assert_rejected(
            &Layer::new().dir("etc/", 0o755).file("etc/.wh.", b"").finish(),
            |e| matches!(e, UnpackError::WhiteoutEscape { path } if path == "etc/.wh."),
        );
        let sandbox = Sandbox::new();
        let layer = Layer::new().symlink("evil", sandbox.canary()).file("evil/.wh.secret", b"").finish();
        assert_rejected(&layer, |e| matches!(e, UnpackError::ResolveParent { .. }));
        let layer = Layer::new().symlink("evil", sandbox.canary()).file("evil/.wh..wh..opq", b"").finish();
        assert_rejected(&layer, |e| matches!(e, UnpackError::ResolveParent { .. }));
    }

    #[test]
    fn device_nodes_are_neutralised() {
        let sandbox = Sandbox::new();
        let layer = Layer::new()
            .special("sda", EntryType::Block)
            .special("mem", EntryType::Char)
            .file("ok", b"ok")
            .finish();
        let report = sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(
            report.neutralised,
            vec![
                Neutralised { path: "sda".into(), reason: "device node skipped" },
                Neutralised { path: "mem".into(), reason: "device node skipped" },
            ]
        );
        assert!(std::fs::symlink_metadata(sandbox.path("sda")).is_err());
        assert!(std::fs::symlink_metadata(sandbox.path("mem")).is_err());
        assert!(sandbox.path("ok").exists());
    }

    #[test]
    fn size_and_count_limits() {
        let limits = UnpackLimits { max_file_bytes: 1000, max_total_bytes: 2500, max_entries: 4 };
        let sandbox = Sandbox::new();
        // Rejected on the declared size, before any data is read.
        let big = Layer::new().file("big", &[7u8; 4096]).finish();
        let error = sandbox.unpack(&big, &limits).unwrap_err();
        assert!(matches!(error, UnpackError::FileTooLarge { size: 4096, limit: 1000, .. }), "{error:?}");
        assert!(!sandbox.path("big").exists());

        let sandbox = Sandbox::new();
        let many_bytes =
            Layer::new().file("a", &[1u8; 900]).file("b", &[1u8; 900]).file("c", &[1u8; 900]).finish();
        let error = sandbox.unpack(&many_bytes, &limits).unwrap_err();
        assert!(matches!(&error, UnpackError::TotalTooLarge { path, .. } if path == "c"), "{error:?}");

        let sandbox = Sandbox::new();
        let mut layer = Layer::new();
        for index in 0..5 {
            layer.file(&format!("f{index}"), b"");
        }
        let error = sandbox.unpack(&layer.finish(), &limits).unwrap_err();
        assert!(matches!(error, UnpackError::TooManyEntries { limit: 4 }), "{error:?}");

        // A directory's declared size counts too: it would otherwise be
        // drained from the stream uncounted.
        let sandbox = Sandbox::new();
        let mut header = raw_header("d/", EntryType::Directory, 3000, 0o755);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &[0u8; 3000][..]).unwrap();
        let error = sandbox.unpack(&builder.into_inner().unwrap(), &limits).unwrap_err();
        assert!(matches!(error, UnpackError::FileTooLarge { .. }), "{error:?}");
    }

    #[test]
    fn oversized_extension_headers_are_rejected_before_reading() {
        let sandbox = Sandbox::new();
        let body = vec![b'a'; EXTENSION_HEADER_LIMIT as usize + 1];
        let mut layer = Layer::new();
        layer.append(raw_header("././@LongLink", EntryType::GNULongName, body.len() as u64, 0o644), &body);
        let error = sandbox.unpack(&layer.file("x", b"").finish(), &UnpackLimits::default()).unwrap_err();
        assert!(matches!(error, UnpackError::ExtensionTooLarge { .. }), "{error:?}");

        let sandbox = Sandbox::new();
        let error =
            sandbox.unpack(&Layer::new().pax(&[("path", b"orphan")]).finish(), &UnpackLimits::default());
        assert!(matches!(error, Err(UnpackError::Malformed { .. })), "{error:?}");
    }

    #[test]
    fn pax_path_cannot_smuggle_an_escape() {
        let layer = Layer::new().pax(&[("path", b"../../pax-escape")]).file("innocent", b"x").finish();
        assert_rejected(
            &layer,
            |e| matches!(e, UnpackError::PathEscape { path } if path == "../../pax-escape"),
        );
    }

    #[test]
    fn only_capability_and_user_xattrs_are_applied() {
        let sandbox = Sandbox::new();
        let layer = Layer::new()
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ("SCHILY.xattr.security.selinux", b"system_u:object_r:shadow_t:s0"),
                ("SCHILY.xattr.user.kept", b"1"),
            ])
            .dir("d/", 0o755)
            .pax(&[("SCHILY.xattr.trusted.overlay.origin", b"forged"), ("path", b"d/file")])
            .file("ignored-name", b"x")
            .finish();
        let report = sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        let dropped: Vec<_> = report.neutralised.iter().map(|n| (n.path.as_str(), n.reason)).collect();
        assert_eq!(
            dropped,
            vec![
                ("d", "trusted.* xattr dropped: it would forge overlayfs metadata"),
                ("d", "trusted.* xattr dropped: it would forge overlayfs metadata"),
                ("d", "security.* xattr other than security.capability dropped"),
                ("d/file", "trusted.* xattr dropped: it would forge overlayfs metadata"),
            ]
        );
        let dir = sandbox.path("d");
        assert_eq!(xattr::get(&dir, "trusted.overlay.opaque").unwrap(), None);
        assert_eq!(xattr::get(&dir, "trusted.overlay.redirect").unwrap(), None);
        assert_eq!(xattr::get(&dir, "user.kept").unwrap(), Some(b"1".to_vec()));
        assert_eq!(xattr::get(sandbox.path("d/file"), "trusted.overlay.origin").unwrap(), None);
        assert!(!sandbox.path("ignored-name").exists());
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let sandbox = Sandbox::new();
        let layer = Layer::new()
            .dir("a/", 0o755)
            .file("a/.wh.gone", b"")
            .dir("d/", 0o755)
            .file("d/.wh..wh..opq", b"")
            .file("d/new", b"new")
            .finish();
        let report = sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert!(report.neutralised.is_empty());
        let gone = std::fs::symlink_metadata(sandbox.path("a/gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        assert!(!sandbox.path("a/.wh.gone").exists());
        assert_eq!(xattr::get(sandbox.path("d"), OVERLAY_OPAQUE_XATTR).unwrap(), Some(b"y".to_vec()));
        assert!(!sandbox.path("d/.wh..wh..opq").exists());
        assert_eq!(std::fs::read(sandbox.path("d/new")).unwrap(), b"new");
    }

    #[test]
    fn aufs_metadata_is_skipped() {
        let sandbox = Sandbox::new();
        let layer = Layer::new().dir(".wh..wh.plnk/", 0o700).file(".wh..wh.plnk/1.2", b"x").finish();
        let report = sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(report.neutralised.len(), 2);
        assert!(!sandbox.path(".wh..wh.plnk").exists());
    }

    /// An overlay mount, unmounted on drop so a failing assertion does not
    /// leave it behind.
    struct OverlayMount {
        merged: PathBuf,
    }

    impl OverlayMount {
        fn read_only(lower_dirs: &[&Path], merged: &Path) -> OverlayMount {
            let lower: Vec<_> = lower_dirs.iter().map(|dir| dir.to_str().unwrap()).collect();
            let status = Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!("ro,lowerdir={}", lower.join(":")))
                .arg(merged)
                .status()
                .unwrap();
            assert!(status.success(), "mount -t overlay failed");
            OverlayMount { merged: merged.to_path_buf() }
        }
    }

    impl Drop for OverlayMount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.merged).status();
        }
    }

    #[test]
    fn overlay_applies_whiteouts_like_docker() {
        let layer1 = Sandbox::new();
        let tar1 = Layer::new()
            .dir("a/", 0o755)
            .file("a/keep", b"keep")
            .file("a/gone", b"gone")
            .dir("d/", 0o755)
            .file("d/old", b"old")
            .finish();
        layer1.unpack(&tar1, &UnpackLimits::default()).unwrap();
        let layer2 = Sandbox::new();
        let tar2 = Layer::new()
            .dir("a/", 0o755)
            .file("a/.wh.gone", b"")
            .dir("d/", 0o755)
            .file("d/.wh..wh..opq", b"")
            .file("d/new", b"new")
            .finish();
        layer2.unpack(&tar2, &UnpackLimits::default()).unwrap();

        let merged = tempfile::tempdir().unwrap();
        let mount = OverlayMount::read_only(&[&layer2.target, &layer1.target], merged.path());
        let root = &mount.merged;
        assert_eq!(std::fs::read(root.join("a/keep")).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(root.join("a/gone")).is_err());
        let mut names: Vec<_> =
            std::fs::read_dir(root.join("d")).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("new")]);
        drop(mount);
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let secret = format!("{}/secret", sandbox.canary());
        let layer = Layer::new()
            // file over file
            .file("f", b"first")
            .file_owned("f", b"second", 0o600, 5, 5)
            // file over a directory tree
            .dir("d/", 0o755)
            .dir("d/sub/", 0o755)
            .file("d/sub/inner", b"inner")
            .symlink("d/sub/out", sandbox.canary())
            .file("d", b"now a file")
            // directory over a symlink to the host
            .symlink("s", sandbox.canary())
            .dir("s/", 0o777)
            // a file over a symlink to a host file: chmod and content must not follow it
            .symlink("t", &secret)
            .file_owned("t", b"mine", 0o777, 0, 0)
            // a file over one name of a hardlinked inode leaves the other name alone
            .file("h1", b"shared")
            .hardlink("h2", "h1")
            .file("h1", b"replaced")
            // a directory over a directory keeps its children
            .dir("keep/", 0o755)
            .file("keep/child", b"child")
            .dir("keep/", 0o700)
            .finish();
        sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(before, sandbox.outside());

        let f = std::fs::metadata(sandbox.path("f")).unwrap();
        assert_eq!(std::fs::read(sandbox.path("f")).unwrap(), b"second");
        assert_eq!((f.mode() & 0o7777, f.uid()), (0o600, 5));
        assert_eq!(std::fs::read(sandbox.path("d")).unwrap(), b"now a file");
        let s = std::fs::symlink_metadata(sandbox.path("s")).unwrap();
        assert!(s.is_dir());
        assert_eq!(s.mode() & 0o7777, 0o777);
        assert_eq!(std::fs::read(sandbox.path("t")).unwrap(), b"mine");
        assert_eq!(std::fs::read(sandbox.path("h2")).unwrap(), b"shared");
        assert_eq!(std::fs::read(sandbox.path("h1")).unwrap(), b"replaced");
        let keep = std::fs::metadata(sandbox.path("keep")).unwrap();
        assert_eq!(keep.mode() & 0o7777, 0o700);
        assert_eq!(std::fs::read(sandbox.path("keep/child")).unwrap(), b"child");
    }

    /// Found by the `layer_unpack` fuzz target: a later entry turned the
    /// parent of an earlier directory into a symlink loop, and the final
    /// pass that sets directory mtimes failed with ELOOP, refusing a layer
    /// that Docker unpacks.
    #[test]
    fn a_symlink_loop_over_an_earlier_directory_is_not_an_error() {
        let sandbox = Sandbox::new();
        let layer = Layer::new().dir("a/a/", 0o755).symlink("a", "a/a").finish();
        sandbox.unpack(&layer, &UnpackLimits::default()).unwrap();
        assert_eq!(std::fs::read_link(sandbox.path("a")).unwrap(), Path::new("a/a"));
    }
}
