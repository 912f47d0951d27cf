//! Output capture: a container's stdout and stderr go into pipes the runtime
//! drains into files, so a slow consumer never blocks the container. The
//! files are anonymous (`O_TMPFILE` in the state directory): they vanish with
//! their last descriptor, so nothing is left on disk, even after a crash.
//!
//! The pump keeps the first `cap` bytes of each stream in its file and
//! counts and drops the rest (the result says `truncated`), through one fixed
//! buffer, so a flood costs CPU but never runtime memory. For a container
//! whose writable layer is a plain directory on the same filesystem (it can
//! fill it), space for the first 16 MiB of each stream is reserved when the
//! file is made, so its own fill does not cost the kept output. Whenever the
//! filesystem is full anyway, the pump keeps what it has and drops the rest
//! the same way. Consumers that want
//! the output live ([`OutputFollower`]) read the file behind the pump at their
//! own pace; the pump announces progress on a `watch` channel and never waits
//! for them.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

const BUFFER_SIZE: usize = 64 * 1024;

/// How far a stream has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamProgress {
    /// Bytes kept in the file.
    pub captured: u64,
    /// Bytes the container wrote in all.
    pub produced: u64,
    /// The container's end of the pipe is closed: no more will come.
    pub closed: bool,
}

impl StreamProgress {
    /// More was produced than kept.
    pub fn truncated(&self) -> bool {
        self.produced > self.captured
    }
}

/// The running pump of one stream.
pub(super) struct Capture {
    file: File,
    progress: watch::Receiver<StreamProgress>,
    task: Option<tokio::task::JoinHandle<std::io::Result<StreamProgress>>>,
}

impl Capture {
    /// Start draining `pipe` into a new anonymous file in `directory`, keeping `cap` bytes;
    /// with `reserved`, the space for the first of them (at most 16 MiB) is
    /// allocated up front.
    pub(super) fn start(
        pipe: OwnedFd,
        directory: &Path,
        cap: u64,
        reserved: bool,
    ) -> std::io::Result<Capture> {
        let file = File::options()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(directory)?;
        if reserved {
            reserve(&file, cap.min(RESERVED_MAX));
        }
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
        let (sender, progress) = watch::channel(StreamProgress::default());
        let task = tokio::spawn(pump(receiver, file.try_clone()?, cap, sender));
        Ok(Capture { file, progress, task: Some(task) })
    }

    /// A reader of this stream from its first byte.
    pub(super) fn follow(&self) -> std::io::Result<OutputFollower> {
        Ok(OutputFollower { file: self.file.try_clone()?, offset: 0, progress: self.progress.clone() })
    }

    /// Wait for the container's end of the pipe to close and the pump to finish.
    pub(super) async fn finish(&mut self) -> std::io::Result<StreamProgress> {
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(*self.progress.borrow()),
        }
    }

    /// Stop pumping now (teardown after a failed start).
    pub(super) fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Read what was kept, at most `cap` bytes.
    pub(super) fn read_captured(&self, length: u64) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; length as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }
}

/// The most space reserved up front for one stream's capture.
const RESERVED_MAX: u64 = 16 << 20;

/// Allocates `bytes` for `file` without changing its size, so that what is
/// kept of a stream (up to that much) still fits when the filesystem fills
/// up (a container's disk layer shares it). Where the filesystem cannot,
/// nothing is reserved.
fn reserve(file: &File, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let length = libc::off_t::try_from(bytes).unwrap_or(libc::off_t::MAX);
    if let Err(error) =
        nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, length)
    {
        tracing::debug!(%error, "output capture: reserving space");
    }
}

async fn pump(
    mut pipe: tokio::net::unix::pipe::Receiver,
    file: File,
    mut cap: u64,
    progress: watch::Sender<StreamProgress>,
) -> std::io::Result<StreamProgress> {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    let mut state = StreamProgress::default();
    loop {
        let read = pipe.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        let keep = (cap - state.captured).min(read as u64) as usize;
        if keep > 0 {
            // A page-cache write; cheap enough not to need a blocking thread.
            // Positional, so readers sharing the descriptor never move our offset.
            match file.write_all_at(&buffer[..keep], state.captured) {
                Ok(()) => state.captured += keep as u64,
                // The state directory's filesystem is full (a container's
                // disk layer can fill it): keep what is kept, and count and
                // drop the rest as if the cap were reached, rather than stop
                // draining the container's pipe.
                Err(error) if matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                    tracing::warn!(kept = state.captured, "output capture: {error}; the rest is dropped");
                    cap = state.captured;
                }
                Err(error) => return Err(error),
            }
        }
        state.produced += read as u64;
        progress.send_replace(state);
    }
    state.closed = true;
    progress.send_replace(state);
    Ok(state)
}

/// Reads a stream's captured bytes as they arrive, at its own pace.
pub struct OutputFollower {
    file: File,
    offset: u64,
    progress: watch::Receiver<StreamProgress>,
}

impl OutputFollower {
    /// The next chunk (at most `buffer.len()` bytes), or `None` once the
    /// stream is closed and everything kept has been read.
    pub async fn next_chunk(&mut self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            let state = *self.progress.borrow_and_update();
            if self.offset < state.captured {
                let want = ((state.captured - self.offset) as usize).min(buffer.len());
                let read = self.file.read_at(&mut buffer[..want], self.offset)?;
                self.offset += read as u64;
                return Ok(Some(read));
            }
            if state.closed {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                // The pump ended; one last look at what it left.
                let state = *self.progress.borrow();
                if self.offset >= state.captured {
                    return Ok(None);
                }
            }
        }
    }
}
