//! The log directory of one long-running container: the segment writer the
//! shim appends with, and the readers the worker serves `quilt logs` from.
//!
//! A log is a directory of segment files named `{start:020}.log`, where
//! `start` is the log offset of the segment's first byte. Offsets count the
//! bytes stored in the log since it was first created, across shim restarts:
//! a new shim continues at the end of the last segment. Bytes the shim could
//! not store (disk full, ...) are counted in the exit file and take no
//! offset, so a segment's bytes always sit at `start..start + len` and the
//! next segment starts where the previous one ends. Only the newest segments
//! are kept; a reader asking for bytes that were rotated away gets the oldest
//! ones still there, and sees that from [`LogChunk::start`].
//!
//! The writer is the only process that creates or deletes segments; readers
//! never lock anything and cope with a segment vanishing under them. Neither
//! side knows about containers, processes or the worker's state.

use std::collections::VecDeque;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Length of a segment file name: 20 digits and `.log`.
const SEGMENT_NAME_BYTES: usize = 24;

/// Bytes read from a log, with the offsets they cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes, contiguous in the log from `start` to `next`.
    pub data: Vec<u8>,
    /// Offset of the first byte of `data`. Greater than the offset asked for
    /// when the bytes in between were rotated away; equal to `next` when there
    /// was nothing to read.
    pub start: u64,
    /// Offset to ask for next: `start + data.len()`.
    pub next: u64,
}

impl LogChunk {
    fn empty_at(offset: u64) -> LogChunk {
        LogChunk { data: Vec::new(), start: offset, next: offset }
    }
}

/// Reads up to `max_bytes` of the log in `dir` from `offset` on.
///
/// Reading at (or past) the end gives empty data with `next` at the end, so a
/// follower can poll with the `next` it was given. A missing directory reads
/// as an empty log.
pub fn read_from(dir: &Path, offset: u64, max_bytes: usize) -> io::Result<LogChunk> {
    let segments = list_segments(dir)?;
    let mut data = Vec::new();
    let mut position = offset;
    let mut chunk_start: Option<u64> = None;
    for (index, &start) in segments.iter().enumerate() {
        let next_start = segments.get(index + 1).copied();
        if next_start.is_some_and(|next_start| position >= next_start) {
            continue;
        }
        if position < start {
            if chunk_start.is_some() {
                // A gap inside what we read: stop, the next call resumes after it.
                break;
            }
            position = start;
        }
        let file = match File::open(dir.join(segment_name(start).as_str())) {
            Ok(file) => file,
            // Rotated away since the listing: its bytes are gone, go on.
            Err(error) if error.kind() == io::ErrorKind::NotFound && chunk_start.is_none() => {
                continue;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => break,
            Err(error) => return Err(error),
        };
        let file_end = start + file.metadata()?.len();
        let segment_end = next_start.map_or(file_end, |next_start| file_end.min(next_start));
        if position > segment_end {
            if next_start.is_some() {
                continue;
            }
            // Past the end of the log: answer from the end, so the caller resyncs.
            position = segment_end;
        }
        chunk_start.get_or_insert(position);
        let room = max_bytes - data.len();
        let wanted = usize::try_from(segment_end - position).map_or(room, |left| left.min(room));
        let read = read_at_into(&file, position - start, wanted, &mut data)?;
        position += read as u64;
        if data.len() >= max_bytes || position < segment_end {
            break;
        }
        if next_start.is_some_and(|next_start| segment_end < next_start) {
            break;
        }
    }
    let Some(start) = chunk_start else {
        // Nothing readable: an empty (or missing) log ends at 0.
        let end = if segments.is_empty() { 0 } else { position };
        return Ok(LogChunk::empty_at(end));
    };
    let next = start + data.len() as u64;
    Ok(LogChunk { data, start, next })
}

/// The last `lines` lines of the log in `dir`, at most `max_bytes` of them
/// (the first line is cut at its front when they do not fit). A final line
/// without a newline counts as a line. A missing directory reads as empty.
pub fn tail(dir: &Path, lines: usize, max_bytes: usize) -> io::Result<LogChunk> {
    let end = end_offset(dir)?;
    if lines == 0 || max_bytes == 0 {
        return Ok(LogChunk::empty_at(end));
    }
    let mut chunk = read_from(dir, end.saturating_sub(max_bytes as u64), max_bytes)?;
    let body = match chunk.data.split_last() {
        Some((b'\n', body)) => body,
        _ => &chunk.data[..],
    };
    let cut = body
        .iter()
        .enumerate()
        .rev()
        .filter(|&(_, &byte)| byte == b'\n')
        .nth(lines - 1)
        .map_or(0, |(index, _)| index + 1);
    chunk.data.drain(..cut);
    chunk.start += cut as u64;
    Ok(chunk)
}

/// The offset just past the last byte stored in the log in `dir`: 0 for an
/// empty or missing log.
pub fn end_offset(dir: &Path) -> io::Result<u64> {
    // The writer may rotate the last segment away (with one segment kept)
    // between our listing and our stat; a fresh listing then finds its successor.
    let mut attempts_left = 3;
    loop {
        let Some(&last) = list_segments(dir)?.last() else {
            return Ok(0);
        };
        match std::fs::metadata(dir.join(segment_name(last).as_str())) {
            Ok(metadata) => return Ok(last + metadata.len()),
            Err(error) if error.kind() == io::ErrorKind::NotFound && attempts_left > 1 => {
                attempts_left -= 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Appends a container's output to the segments of one log directory.
///
/// Allocates only when it opens the directory; after that a write is one or
/// more `write(2)` calls, and a rotation reuses the writer's path buffer and
/// segment list.
#[derive(Debug)]
pub(super) struct SegmentWriter {
    dir: PathBuf,
    /// Scratch buffer for segment paths, reused on every rotation.
    path: PathBuf,
    segment_bytes: u64,
    max_segments: usize,
    /// Start offsets of the segments on disk, oldest first.
    segments: VecDeque<u64>,
    current: Option<File>,
    current_bytes: u64,
    end: u64,
    dropped: u64,
}

impl SegmentWriter {
    /// Opens (creating it with mode 0700 if missing) the log directory and
    /// continues after its last segment.
    pub(super) fn open(dir: &Path, segment_bytes: u64, max_segments: usize) -> io::Result<SegmentWriter> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let listed = list_segments(dir)?;
        let mut writer = SegmentWriter {
            dir: dir.to_path_buf(),
            path: dir.join(segment_name(0).as_str()),
            segment_bytes: segment_bytes.max(1),
            max_segments: max_segments.max(1),
            // A rotation pushes before it prunes: one spare slot.
            segments: VecDeque::with_capacity(listed.len().max(max_segments.min(64)) + 1),
            current: None,
            current_bytes: 0,
            end: 0,
            dropped: 0,
        };
        writer.segments.extend(listed);
        if let Some(&last) = writer.segments.back() {
            writer.set_path(last);
            let file = open_segment(&writer.path)?;
            writer.current_bytes = file.metadata()?.len();
            writer.end = last + writer.current_bytes;
            writer.current = Some(file);
        }
        writer.prune();
        Ok(writer)
    }

    /// Appends `bytes`, starting a new segment first when the current one is
    /// full. Never fails: what cannot be stored is counted in [`Self::dropped`].
    pub(super) fn write(&mut self, bytes: &[u8]) {
        if self.current.is_none() || self.current_bytes >= self.segment_bytes {
            self.rotate();
        }
        let mut rest = bytes;
        if let Some(file) = self.current.as_mut() {
            while !rest.is_empty() {
                match file.write(rest) {
                    Ok(0) => break,
                    Ok(written) => {
                        rest = &rest[written..];
                        self.current_bytes += written as u64;
                        self.end += written as u64;
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        self.dropped += rest.len() as u64;
    }

    /// Flushes the current segment, and the directory entries of the
    /// segments, to disk.
    pub(super) fn sync(&self) -> io::Result<()> {
        if let Some(file) = &self.current {
            file.sync_all()?;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Bytes given to [`Self::write`] that could not be stored.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Starts a segment at the current end offset and deletes the oldest
    /// beyond the limit. On failure the writer has no current segment, and
    /// the next write tries again.
    fn rotate(&mut self) {
        self.current = None;
        self.set_path(self.end);
        let Ok(file) = open_segment(&self.path) else {
            return;
        };
        // Only a segment left empty by an earlier attempt can have this start.
        if self.segments.back() != Some(&self.end) {
            self.segments.push_back(self.end);
        }
        self.current = Some(file);
        self.current_bytes = 0;
        self.prune();
    }

    fn prune(&mut self) {
        while self.segments.len() > self.max_segments {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.set_path(oldest);
            // A segment that cannot be deleted stays readable; nothing to do.
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn set_path(&mut self, start: u64) {
        self.path.set_file_name(segment_name(start).as_str());
    }
}

fn open_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// A segment's file name, formatted on the stack.
struct SegmentName([u8; SEGMENT_NAME_BYTES]);

impl SegmentName {
    fn as_str(&self) -> &str {
        // Only ASCII digits and ".log" are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn segment_name(start: u64) -> SegmentName {
    let mut name = [0u8; SEGMENT_NAME_BYTES];
    let mut value = start;
    for digit in name[..20].iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    name[20..].copy_from_slice(b".log");
    SegmentName(name)
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Start offsets of the segments in `dir`, oldest first; other files are
/// ignored and a missing directory has none.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut starts = Vec::new();
    for entry in entries {
        if let Some(start) = entry?.file_name().to_str().and_then(parse_segment_name) {
            starts.push(start);
        }
    }
    starts.sort_unstable();
    Ok(starts)
}

/// Appends up to `wanted` bytes of `file` from `position` to `data`; returns
/// how many it got (fewer at the end of the file).
fn read_at_into(file: &File, position: u64, wanted: usize, data: &mut Vec<u8>) -> io::Result<usize> {
    let old_len = data.len();
    data.resize(old_len + wanted, 0);
    let mut got = 0;
    while got < wanted {
        match file.read_at(&mut data[old_len + got..], position + got as u64) {
            Ok(0) => break,
            Ok(read) => got += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                data.truncate(old_len);
                return Err(error);
            }
        }
    }
    data.truncate(old_len + got);
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn contents(dir: &Path, start: u64) -> Vec<u8> {
        std::fs::read(dir.join(segment_name(start).as_str())).unwrap()
    }

    #[test]
    fn segment_names_are_zero_padded_offsets() {
        assert_eq!(segment_name(0).as_str(), "00000000000000000000.log");
        assert_eq!(segment_name(1234).as_str(), "00000000000000001234.log");
        assert_eq!(segment_name(u64::MAX).as_str(), "18446744073709551615.log");
        assert_eq!(parse_segment_name("00000000000000001234.log"), Some(1234));
        assert_eq!(parse_segment_name("1234.log"), None);
        assert_eq!(parse_segment_name("00000000000000001234.log.tmp"), None);
        assert_eq!(parse_segment_name("99999999999999999999.log"), None);
    }

    #[test]
    fn rotates_once_a_segment_reaches_segment_bytes() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("logs");
        let mut writer = SegmentWriter::open(&dir, 10, 10).unwrap();
        writer.write(b"123456");
        writer.write(b"789abc");
        // 12 bytes now: the next write starts a new segment at offset 12.
        writer.write(b"def");
        assert_eq!(names(&dir), ["00000000000000000000.log", "00000000000000000012.log"]);
        assert_eq!(contents(&dir, 0), b"123456789abc");
        assert_eq!(contents(&dir, 12), b"def");
        assert_eq!(end_offset(&dir).unwrap(), 15);
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn keeps_at_most_the_newest_segments() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("logs");
        let mut writer = SegmentWriter::open(&dir, 4, 2).unwrap();
        for chunk in [b"aaaa", b"bbbb", b"cccc", b"dddd"] {
            writer.write(chunk);
        }
        assert_eq!(names(&dir), ["00000000000000000008.log", "00000000000000000012.log"]);
        assert_eq!(end_offset(&dir).unwrap(), 16);
    }

    #[test]
    fn a_new_writer_continues_after_the_last_segment() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("logs");
        {
            let mut writer = SegmentWriter::open(&dir, 10, 3).unwrap();
            writer.write(b"first\n");
        }
        let mut writer = SegmentWriter::open(&dir, 10, 3).unwrap();
        assert_eq!(end_offset(&dir).unwrap(), 6);
        writer.write(b"second\n");
        writer.write(b"third\n");
        assert_eq!(contents(&dir, 0), b"first\nsecond\n");
        assert_eq!(contents(&dir, 13), b"third\n");
        drop(writer);

        // A restart with fewer segments allowed prunes the oldest at once.
        let mut writer = SegmentWriter::open(&dir, 10, 1).unwrap();
        assert_eq!(names(&dir), ["00000000000000000013.log"]);
        writer.write(b"fourth\n");
        assert_eq!(contents(&dir, 13), b"third\nfourth\n");
        assert_eq!(end_offset(&dir).unwrap(), 26);
    }

    #[test]
    fn a_full_last_segment_is_not_appended_to_after_a_restart() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("logs");
        SegmentWriter::open(&dir, 4, 3).unwrap().write(b"abcdef");
        let mut writer = SegmentWriter::open(&dir, 4, 3).unwrap();
        writer.write(b"gh");
        assert_eq!(contents(&dir, 0), b"abcdef");
        assert_eq!(contents(&dir, 6), b"gh");
    }

    #[test]
    fn counts_bytes_it_cannot_store_and_gives_them_no_offset() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("logs");
        let mut writer = SegmentWriter::open(&dir, 4, 3).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        writer.write(b"lost");
        assert_eq!(writer.dropped(), 4);
        assert_eq!(end_offset(&dir).unwrap(), 0);
        std::fs::create_dir(&dir).unwrap();
        writer.write(b"kept");
        assert_eq!(contents(&dir, 0), b"kept");
        assert_eq!(writer.dropped(), 4);
    }

    #[test]
    fn ignores_files_that_are_not_segments() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
        std::fs::write(dir.join("00000000000000000000.log.tmp"), b"hello").unwrap();
        assert_eq!(end_offset(dir).unwrap(), 0);
        let mut writer = SegmentWriter::open(dir, 4, 1).unwrap();
        writer.write(b"abcd");
        writer.write(b"efgh");
        assert!(dir.join("notes.txt").exists());
        assert_eq!(read_from(dir, 0, 100).unwrap().data, b"efgh");
    }

    fn three_segments(dir: &Path, keep: usize) {
        let mut writer = SegmentWriter::open(dir, 4, keep).unwrap();
        for chunk in [&b"abcd"[..], b"efgh", b"ij"] {
            writer.write(chunk);
        }
    }

    #[test]
    fn read_from_spans_segments() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        three_segments(dir, 3);
        let all = read_from(dir, 2, 100).unwrap();
        assert_eq!((all.data.as_slice(), all.start, all.next), (&b"cdefghij"[..], 2, 10));
        let some = read_from(dir, 2, 3).unwrap();
        assert_eq!((some.data.as_slice(), some.start, some.next), (&b"cde"[..], 2, 5));
        let rest = read_from(dir, some.next, 100).unwrap();
        assert_eq!((rest.data.as_slice(), rest.start, rest.next), (&b"fghij"[..], 5, 10));
        assert_eq!(read_from(dir, 8, 0).unwrap(), LogChunk::empty_at(8));
    }

    #[test]
    fn read_from_the_end_is_empty_and_stays_there() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        three_segments(dir, 3);
        assert_eq!(read_from(dir, 10, 100).unwrap(), LogChunk::empty_at(10));
        // An offset from another life of the log is answered from the end.
        assert_eq!(read_from(dir, 1000, 100).unwrap(), LogChunk::empty_at(10));
    }

    #[test]
    fn read_from_a_rotated_away_offset_starts_at_the_oldest_byte_kept() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        three_segments(dir, 2);
        let chunk = read_from(dir, 1, 100).unwrap();
        assert_eq!((chunk.data.as_slice(), chunk.start, chunk.next), (&b"efghij"[..], 4, 10));
    }

    #[test]
    fn tail_spans_a_segment_boundary() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let mut writer = SegmentWriter::open(dir, 6, 10).unwrap();
        for chunk in [&b"one\ntw"[..], b"o\nthree\n", b"four"] {
            writer.write(chunk);
        }
        assert_eq!(names(dir).len(), 3);
        let last_two = tail(dir, 2, 1000).unwrap();
        assert_eq!(last_two.data, b"three\nfour");
        assert_eq!((last_two.start, last_two.next), (8, 18));
        assert_eq!(tail(dir, 3, 1000).unwrap().data, b"two\nthree\nfour");
        assert_eq!(tail(dir, 10, 1000).unwrap().data, b"one\ntwo\nthree\nfour");
        // The byte limit wins over the line count, cutting the first line.
        assert_eq!(tail(dir, 3, 8).unwrap().data, b"ree\nfour");
        assert_eq!(tail(dir, 0, 1000).unwrap(), LogChunk::empty_at(18));

        writer.write(b"\n");
        assert_eq!(tail(dir, 1, 1000).unwrap().data, b"four\n");
        assert_eq!(tail(dir, 2, 1000).unwrap().data, b"three\nfour\n");
    }

    #[test]
    fn a_missing_directory_reads_as_an_empty_log() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("never-created");
        assert_eq!(end_offset(&dir).unwrap(), 0);
        assert_eq!(read_from(&dir, 0, 100).unwrap(), LogChunk::empty_at(0));
        assert_eq!(read_from(&dir, 42, 100).unwrap(), LogChunk::empty_at(0));
        assert_eq!(tail(&dir, 10, 100).unwrap(), LogChunk::empty_at(0));
    }
}
