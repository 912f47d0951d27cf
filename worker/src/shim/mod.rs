//! The shim: the small host-side parent of one long-running container's init,
//! so the container outlives the worker process.
//!
//! It owns three descriptors it inherits at exec ([`INIT_PIDFD`],
//! [`OUTPUT_FD`], [`HOLD_FD`]), the container's log directory (segment files;
//! the worker reads them with [`read_from`], [`tail`] and [`end_offset`]) and
//! the exit file ([`ShimExit`], read with [`read_exit_file`]). It copies the
//! init's merged stdout and stderr into the log, waits until the worker
//! releases the hold, reaps the init when it exits, drains what is left of
//! the output (at most [`DRAIN_AFTER_EXIT`]) and records the exit. It never
//! creates or signals the container, and knows nothing of the worker's state,
//! NATS or tasks.
//!
//! One shim runs per long-running container, so it is built to be small: one
//! thread, no runtime, a fixed read buffer, no allocation once it is copying,
//! and a command line parsed by hand rather than with clap. The loop is
//! `poll(2)` over the pidfd, the output pipe and the hold pipe, never waiting
//! on the container: a log it cannot write costs bytes (counted in the exit
//! file), never a blocked container.
//!
//! The one `unsafe` line outside the engine is [`main_from_args`] adopting
//! descriptors 3 to 5: no safe API turns an inherited descriptor number into
//! an `OwnedFd`.

mod exit;
mod logs;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

pub use exit::{read_exit_file, write_exit_file, ShimExit};
pub use logs::{end_offset, read_from, tail, LogChunk};

use logs::SegmentWriter;

/// The descriptor on which the shim inherits a pidfd of the container's init,
/// its own child.
pub const INIT_PIDFD: RawFd = 3;
/// The descriptor on which the shim inherits the read end of the pipe that
/// carries the init's stdout and stderr.
pub const OUTPUT_FD: RawFd = 4;
/// The descriptor on which the shim inherits the read end of the hold pipe:
/// the init is not reaped before one byte or EOF arrives on it, so the worker
/// can read the init's start time while its pid cannot be reused.
pub const HOLD_FD: RawFd = 5;

/// How long the shim keeps copying output after the init exited, for
/// processes that still hold the pipe open.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Bytes read from the output pipe at a time. Each shim's buffer is private
/// memory, multiplied by the number of long-running containers (PERF.md P5:
/// 200 of them within 40 MiB; a shim measured ~150 KiB Private_Dirty with
/// this buffer, 64 KiB would add 48 KiB each). A quarter of the default pipe
/// still empties it in four reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

const LOG_DIR_FLAG: &str = "--log-dir";
const EXIT_FILE_FLAG: &str = "--exit-file";
const SEGMENT_BYTES_FLAG: &str = "--segment-bytes";
const SEGMENTS_FLAG: &str = "--segments";
const USAGE: &str = "usage: quilt-shim --log-dir DIR --exit-file PATH --segment-bytes N --segments K";

/// What one shim does: where the log and the exit record go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// The container's log directory, created (mode 0700) if missing.
    pub log_dir: PathBuf,
    /// Where the exit record is written once the init has exited.
    pub exit_file: PathBuf,
    /// A segment that has reached this size is closed at the next read.
    pub segment_bytes: u64,
    /// How many segments are kept; older ones are deleted.
    pub segments: usize,
}

impl ShimConfig {
    /// The shim's command line (without the program name) for this config.
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            LOG_DIR_FLAG.into(),
            self.log_dir.clone().into(),
            EXIT_FILE_FLAG.into(),
            self.exit_file.clone().into(),
            SEGMENT_BYTES_FLAG.into(),
            self.segment_bytes.to_string().into(),
            SEGMENTS_FLAG.into(),
            self.segments.to_string().into(),
        ]
    }
}

/// A step of the shim that failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// Setting the signal mask at start failed.
    #[error("cannot set the signal mask")]
    SignalMask(#[source] Errno),
    /// A descriptor the shim should have inherited is not open.
    #[error("inherited descriptor {fd} is not open")]
    InheritedFd {
        /// The descriptor number.
        fd: RawFd,
        /// Why it could not be checked.
        #[source]
        source: io::Error,
    },
    /// The log directory could not be created or its last segment opened.
    #[error("cannot open the log directory {path}")]
    OpenLogs {
        /// The log directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the descriptors failed.
    #[error("poll failed")]
    Poll(#[source] Errno),
    /// The init's exit status could not be read.
    #[error("cannot collect the init's exit status")]
    Wait(#[source] Errno),
    /// `waitid` reported something other than an exit.
    #[error("waitid reported {0:?}, not an exit")]
    UnexpectedWaitStatus(WaitStatus),
    /// Reaping the exited init failed.
    #[error("cannot reap the init")]
    Reap(#[source] Errno),
    /// The exit record could not be written.
    #[error("cannot write the exit file {path}")]
    WriteExitFile {
        /// The exit file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The `quilt-shim` program: sets the signal mask, parses the command line,
/// takes over the inherited descriptors, closes any others, runs the shim.
/// Returns the process exit code: 0 once the exit file is written, 2 for a
/// bad command line, 1 for any other failure (reported on stderr).
pub fn main_from_args() -> i32 {
    if let Err(error) = mask_signals() {
        report(&ShimError::SignalMask(error));
        return 1;
    }
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("quilt-shim: {error}\n{USAGE}");
            return 2;
        }
    };
    let inherited = adopt_inherited_fd(INIT_PIDFD).and_then(|init| {
        let output = adopt_inherited_fd(OUTPUT_FD)?;
        let hold = adopt_inherited_fd(HOLD_FD)?;
        Ok((init, output, hold))
    });
    let (init, output, hold) = match inherited {
        Ok(fds) => fds,
        Err(error) => {
            report(&error);
            return 1;
        }
    };
    close_other_fds();
    match run(init, output, hold, &config) {
        Ok(_) => 0,
        Err(error) => {
            report(&error);
            1
        }
    }
}

/// The shim's loop: copies `output` into the log until the init (`init`, a
/// pidfd of a child of this process) has exited and been reaped, not before
/// `hold` gave a byte or EOF; then drains `output` until EOF (at most
/// [`DRAIN_AFTER_EXIT`]), flushes the log and writes the exit file.
pub fn run(
    init: OwnedFd,
    output: OwnedFd,
    hold: OwnedFd,
    config: &ShimConfig,
) -> Result<ShimExit, ShimError> {
    let mut log = SegmentWriter::open(&config.log_dir, config.segment_bytes, config.segments)
        .map_err(|source| ShimError::OpenLogs { path: config.log_dir.clone(), source })?;
    let mut output = Some(File::from(output));
    let mut hold = Some(File::from(hold));
    let mut buffer = [0u8; READ_BUFFER_BYTES];

    let status = loop {
        // The pidfd turns readable at exit; while held it is not watched,
        // or poll would report it on every turn.
        let watch_init = hold.is_none().then(|| init.as_fd());
        let ready = wait_ready([borrow(&output), borrow(&hold), watch_init], PollTimeout::NONE)?;
        if ready[0] {
            copy_output(&mut output, &mut buffer, &mut log);
        }
        if ready[1] {
            read_hold(&mut hold);
        }
        if ready[2] {
            if let Some(status) = collect_exit(&init)? {
                break status;
            }
        }
    };
    let exited_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    drop(init);

    let deadline = Instant::now() + DRAIN_AFTER_EXIT;
    while output.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Rounded up, so the last turn does not spin on a zero timeout.
        let millis = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
        let ready = wait_ready([borrow(&output), None, None], PollTimeout::from(millis))?;
        if ready[0] {
            copy_output(&mut output, &mut buffer, &mut log);
        }
    }

    // A failed flush must not cost the exit record, which is what the worker
    // waits for; the bytes are in the page cache either way.
    let _ = log.sync();
    let exit = ShimExit {
        exit_code: status.exit_code,
        signal: status.signal,
        exited_at_unix_ms,
        log_bytes_dropped: log.dropped(),
    };
    write_exit_file(&config.exit_file, &exit)
        .map_err(|source| ShimError::WriteExitFile { path: config.exit_file.clone(), source })?;
    Ok(exit)
}

/// How the init ended: exactly one field is set.
#[derive(Debug, Clone, Copy)]
struct InitStatus {
    exit_code: Option<i32>,
    signal: Option<i32>,
}

fn borrow(file: &Option<File>) -> Option<BorrowedFd<'_>> {
    file.as_ref().map(AsFd::as_fd)
}

/// Polls the descriptors given (a `None` is not watched) and says which are
/// ready; none when interrupted or timed out. Callers always watch at least
/// one descriptor.
fn wait_ready(watched: [Option<BorrowedFd<'_>>; 3], timeout: PollTimeout) -> Result<[bool; 3], ShimError> {
    let mut ready = [false; 3];
    let Some(&filler) = watched.iter().flatten().next() else {
        return Ok(ready);
    };
    // A fixed array, only its first `count` entries polled: no allocation
    // per turn. The filler entries past `count` are never passed to poll.
    let mut fds: [PollFd<'_>; 3] = std::array::from_fn(|_| PollFd::new(filler, PollFlags::empty()));
    let mut slots = [0usize; 3];
    let mut count = 0;
    for (slot, fd) in watched.iter().enumerate() {
        if let Some(fd) = fd {
            fds[count] = PollFd::new(*fd, PollFlags::POLLIN);
            slots[count] = slot;
            count += 1;
        }
    }
    match poll(&mut fds[..count], timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(error) => return Err(ShimError::Poll(error)),
    }
    for (fd, &slot) in fds[..count].iter().zip(&slots) {
        ready[slot] = fd.revents().is_some_and(|revents| !revents.is_empty());
    }
    Ok(ready)
}

/// One read from the output pipe into the log; EOF or a read error closes
/// the pipe, which makes the container's writes fail instead of block.
fn copy_output(output: &mut Option<File>, buffer: &mut [u8], log: &mut SegmentWriter) {
    let Some(file) = output.as_mut() else {
        return;
    };
    match file.read(buffer) {
        Ok(0) => *output = None,
        Ok(read) => log.write(&buffer[..read]),
        Err(error) if is_transient(&error) => {}
        Err(_) => *output = None,
    }
}

/// Reads the hold pipe: a byte, EOF or an error releases the hold (an
/// unreadable hold pipe must not keep the init a zombie forever).
fn read_hold(hold: &mut Option<File>) {
    let Some(file) = hold.as_mut() else {
        return;
    };
    match file.read(&mut [0u8; 1]) {
        Err(error) if is_transient(&error) => {}
        _ => *hold = None,
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}

/// Reads the exited init's status, then reaps it. `None` when interrupted.
fn collect_exit(init: &OwnedFd) -> Result<Option<InitStatus>, ShimError> {
    // Peek first (WNOWAIT): nix turns a realtime signal into EINVAL after
    // waitid has already reaped, which would lose the status for good.
    let status = match waitid(Id::PIDFd(init.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
        Ok(WaitStatus::Exited(_, code)) => InitStatus { exit_code: Some(code), signal: None },
        Ok(WaitStatus::Signaled(_, signal, _)) => InitStatus { exit_code: None, signal: Some(signal as i32) },
        Ok(other) => return Err(ShimError::UnexpectedWaitStatus(other)),
        Err(Errno::EINTR) => return Ok(None),
        Err(Errno::EINVAL) => InitStatus {
            exit_code: None,
            signal: Some(zombie_signal(init).ok_or(ShimError::Wait(Errno::EINVAL))?),
        },
        Err(error) => return Err(ShimError::Wait(error)),
    };
    loop {
        match waitid(Id::PIDFd(init.as_fd()), WaitPidFlag::WEXITED) {
            // EINVAL again is nix failing to name the signal: reaped all the same.
            Ok(_) | Err(Errno::EINVAL) => return Ok(Some(status)),
            Err(Errno::EINTR) => {}
            Err(error) => return Err(ShimError::Reap(error)),
        }
    }
}

/// The signal that killed the init, read from its zombie's
/// `/proc/<pid>/stat` (field 52, the raw wait status; proc(5)) for the
/// signals nix has no name for.
fn zombie_signal(init: &OwnedFd) -> Option<i32> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", init.as_raw_fd())).ok()?;
    let pid: u32 = fdinfo.lines().find_map(|line| line.strip_prefix("Pid:"))?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces and ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if fields.next()? != "Z" {
        return None;
    }
    let wait_status: i32 = fields.nth(52 - 4)?.parse().ok()?;
    let signal = wait_status & 0x7f;
    (signal != 0).then_some(signal)
}

/// Unblocks every signal but SIGINT, SIGHUP and SIGPIPE, which stay blocked:
/// the shim is exec'd with an inherited mask, and must not die of a stray
/// terminal signal or of a closed pipe. Blocking them is the same as ignoring
/// them for a process that never execs or forks, and needs no `sigaction`.
fn mask_signals() -> Result<(), Errno> {
    let mut blocked = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
        blocked.add(signal);
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&blocked), None)
}

/// Takes ownership of a descriptor the shim inherited across exec.
fn adopt_inherited_fd(fd: RawFd) -> Result<OwnedFd, ShimError> {
    // Ownership is taken once per descriptor, before the shim opens any
    // file of its own (see `take_inherited_fd`'s contract).
    crate::engine::take_inherited_fd(fd).map_err(|source| ShimError::InheritedFd { fd, source })
}

/// Closes every descriptor above [`HOLD_FD`]: whatever else leaked through
/// exec would be kept open as long as the container runs. Best effort: a
/// shim without /proc still works.
fn close_other_fds() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the listing's own descriptor is among them, and is
    // closed (by the drop) before the loop, which then sees EBADF for it.
    let leaked: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > HOLD_FD)
        .collect();
    for fd in leaked {
        let _ = nix::unistd::close(fd);
    }
}

fn report(error: &dyn std::error::Error) {
    let mut message = format!("quilt-shim: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
}

/// A command line the shim refuses.
#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("unknown argument {0:?}")]
    Unknown(OsString),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} is given twice")]
    Repeated(&'static str),
    #[error("{flag} needs a whole number of at least 1, not {value:?}")]
    NotPositive { flag: &'static str, value: OsString },
    #[error("{0} is required")]
    Missing(&'static str),
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<ShimConfig, ArgsError> {
    let mut log_dir = None;
    let mut exit_file = None;
    let mut segment_bytes = None;
    let mut segments = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let flag = match arg.to_str() {
            Some(LOG_DIR_FLAG) => LOG_DIR_FLAG,
            Some(EXIT_FILE_FLAG) => EXIT_FILE_FLAG,
            Some(SEGMENT_BYTES_FLAG) => SEGMENT_BYTES_FLAG,
            Some(SEGMENTS_FLAG) => SEGMENTS_FLAG,
            _ => return Err(ArgsError::Unknown(arg)),
        };
        let value = args.next().ok_or(ArgsError::MissingValue(flag))?;
        match flag {
            LOG_DIR_FLAG => set_once(&mut log_dir, PathBuf::from(value), flag)?,
            EXIT_FILE_FLAG => set_once(&mut exit_file, PathBuf::from(value), flag)?,
            SEGMENT_BYTES_FLAG => set_once(&mut segment_bytes, positive(flag, value)?, flag)?,
            _ => {
                let count = positive(flag, value.clone())?;
                let count = usize::try_from(count).map_err(|_| ArgsError::NotPositive { flag, value })?;
                set_once(&mut segments, count, flag)?;
            }
        }
    }
    Ok(ShimConfig {
        log_dir: log_dir.ok_or(ArgsError::Missing(LOG_DIR_FLAG))?,
        exit_file: exit_file.ok_or(ArgsError::Missing(EXIT_FILE_FLAG))?,
        segment_bytes: segment_bytes.ok_or(ArgsError::Missing(SEGMENT_BYTES_FLAG))?,
        segments: segments.ok_or(ArgsError::Missing(SEGMENTS_FLAG))?,
    })
}

fn set_once<T>(slot: &mut Option<T>, value: T, flag: &'static str) -> Result<(), ArgsError> {
    if slot.replace(value).is_some() {
        return Err(ArgsError::Repeated(flag));
    }
    Ok(())
}

fn positive(flag: &'static str, value: OsString) -> Result<u64, ArgsError> {
    match value.to_str().and_then(|text| text.parse::<u64>().ok()) {
        Some(number) if number >= 1 => Ok(number),
        _ => Err(ArgsError::NotPositive { flag, value }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    #[allow(unsafe_code)]
    fn pidfd_open(pid: u32) -> OwnedFd {
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: pidfd_open(2) takes two integers and borrows no memory.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: a descriptor the kernel has just returned to us, owned by
        // nothing else.
        unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd).unwrap()) }
    }

    /// A `sh -c script` child with stdout and stderr on one pipe, as the
    /// shim gets them: the child, its pidfd and the pipe's read end.
    fn start(script: &str) -> (Child, OwnedFd, OwnedFd) {
        let (reader, writer) = std::io::pipe().unwrap();
        // The Command (and its copies of the write end) is dropped right
        // after spawn, so EOF comes when the child's side closes.
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id());
        (child, pidfd, reader.into())
    }

    /// A hold pipe already released with one byte.
    fn released_hold() -> OwnedFd {
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"x").unwrap();
        reader.into()
    }

    fn config_in(dir: &Path, segment_bytes: u64, segments: usize) -> ShimConfig {
        ShimConfig { log_dir: dir.join("logs"), exit_file: dir.join("exit.json"), segment_bytes, segments }
    }

    fn process_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn copies_merged_output_and_records_the_exit_code() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        let (_child, init, output) = start("echo out; echo err >&2; exit 3");
        let exit = run(init, output, released_hold(), &config).unwrap();
        assert_eq!((exit.exit_code, exit.signal), (Some(3), None));
        assert_eq!(exit.log_bytes_dropped, 0);
        assert!(exit.exited_at_unix_ms > 1_600_000_000_000);
        let log = read_from(&config.log_dir, 0, 1000).unwrap();
        assert_eq!(log.data, b"out\nerr\n");
        assert_eq!(read_exit_file(&config.exit_file).unwrap(), Some(exit));
    }

    #[test]
    fn a_killed_init_reports_its_signal() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        let (mut child, init, output) = start("exec sleep 30");
        child.kill().unwrap();
        // A hold closed without a byte (EOF) releases it too.
        let (hold, _) = std::io::pipe().unwrap();
        let exit = run(init, output, hold.into(), &config).unwrap();
        assert_eq!((exit.exit_code, exit.signal), (None, Some(9)));
        assert_eq!(read_exit_file(&config.exit_file).unwrap(), Some(exit));
    }

    #[test]
    fn a_realtime_signal_is_reported_by_number() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        let (_child, init, output) = start("kill -s 40 $$");
        let exit = run(init, output, released_hold(), &config).unwrap();
        assert_eq!((exit.exit_code, exit.signal), (None, Some(40)));
    }

    #[test]
    fn output_beyond_the_kept_segments_is_rotated_away() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1000, 3);
        let (_child, init, output) = start("head -c 1048576 /dev/zero");
        let exit = run(init, output, released_hold(), &config).unwrap();
        assert_eq!(exit.exit_code, Some(0));
        let segments = std::fs::read_dir(&config.log_dir).unwrap().count();
        assert_eq!(segments, 3);
        assert_eq!(end_offset(&config.log_dir).unwrap(), 1_048_576);
        let kept = read_from(&config.log_dir, 0, 1 << 20).unwrap();
        assert!(kept.start > 0);
        assert_eq!(kept.next, 1_048_576);
        assert!(kept.data.iter().all(|&byte| byte == 0));
    }

    #[test]
    fn a_held_shim_copies_output_but_does_not_reap() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        let (child, init, output) = start("echo before; exit 4");
        let pid = child.id();
        let (hold, mut release) = std::io::pipe().unwrap();
        let shim = {
            let config = config.clone();
            std::thread::spawn(move || run(init, output, hold.into(), &config))
        };
        eventually("the output in the log", || {
            read_from(&config.log_dir, 0, 100).unwrap().data == b"before\n"
        });
        eventually("the init to exit", || process_state(pid) == Some('Z'));
        // Exited and not reaped while held: still a zombie a while later.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(process_state(pid), Some('Z'));
        assert!(!shim.is_finished());
        assert_eq!(read_exit_file(&config.exit_file).unwrap(), None);

        release.write_all(b"x").unwrap();
        let exit = shim.join().unwrap().unwrap();
        assert_eq!(exit.exit_code, Some(4));
        assert_eq!(process_state(pid), None);
    }

    #[test]
    fn output_closed_before_the_exit_still_waits_for_it() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        let (_child, init, output) = start("echo bye; exec >&- 2>&-; sleep 0.3; exit 5");
        let exit = run(init, output, released_hold(), &config).unwrap();
        assert_eq!(exit.exit_code, Some(5));
        assert_eq!(read_from(&config.log_dir, 0, 100).unwrap().data, b"bye\n");
    }

    #[test]
    fn draining_after_the_exit_is_bounded() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        // A background process keeps the pipe open long after the init exits.
        let (_child, init, output) = start("sleep 60 & echo $!; exit 0");
        let exit = run(init, output, released_hold(), &config).unwrap();
        assert_eq!(exit.exit_code, Some(0));
        let log = read_from(&config.log_dir, 0, 100).unwrap().data;
        let straggler: i32 = String::from_utf8(log).unwrap().trim().parse().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(straggler), Signal::SIGKILL).unwrap();
    }

    #[test]
    fn a_restarted_shim_continues_the_log() {
        let temp = tempfile::tempdir().unwrap();
        let config = config_in(temp.path(), 1 << 20, 4);
        for line in ["first", "second"] {
            let (_child, init, output) = start(&format!("echo {line}"));
            run(init, output, released_hold(), &config).unwrap();
        }
        let log = read_from(&config.log_dir, 0, 100).unwrap();
        assert_eq!((log.data.as_slice(), log.next), (&b"first\nsecond\n"[..], 13));
        assert_eq!(tail(&config.log_dir, 1, 100).unwrap().data, b"second\n");
    }

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_command_line_it_builds() {
        let config = parse_args(args(
            "--log-dir /var/lib/quilt/logs/c1 --exit-file /run/c1.exit --segment-bytes 1048576 --segments 8",
        ))
        .unwrap();
        assert_eq!(
            config,
            ShimConfig {
                log_dir: "/var/lib/quilt/logs/c1".into(),
                exit_file: "/run/c1.exit".into(),
                segment_bytes: 1_048_576,
                segments: 8,
            }
        );
        assert_eq!(parse_args(config.to_args()).unwrap(), config);
    }

    #[test]
    fn rejects_bad_command_lines() {
        let full = "--log-dir d --exit-file e --segment-bytes 10 --segments 2";
        let cases = [
            (format!("{full} --verbose"), "unknown argument \"--verbose\""),
            ("--log-dir".to_string(), "--log-dir needs a value"),
            (format!("{full} --segments 3"), "--segments is given twice"),
            (
                full.replace("--segment-bytes 10", "--segment-bytes 0"),
                "--segment-bytes needs a whole number of at least 1, not \"0\"",
            ),
            (
                full.replace("--segments 2", "--segments two"),
                "--segments needs a whole number of at least 1, not \"two\"",
            ),
            ("--log-dir d --segment-bytes 10 --segments 2".to_string(), "--exit-file is required"),
        ];
        for (line, expected) in cases {
            let error = parse_args(args(&line)).unwrap_err();
            assert_eq!(error.to_string(), expected, "for {line:?}");
        }
    }
}
