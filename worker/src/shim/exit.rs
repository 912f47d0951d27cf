//! The exit file: how a long-running container's init ended, written once by
//! its shim and read by the worker, possibly long after both are gone.
//!
//! It is one JSON object, written to `PATH.tmp`, flushed, renamed over
//! `PATH` and the directory flushed, so a reader sees either no file or the
//! whole record, even across a power loss.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How a container's init ended, as its shim saw it.
///
/// Exactly one of `exit_code` and `signal` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExit {
    /// The exit status, when the init exited by itself.
    pub exit_code: Option<i32>,
    /// The signal number, when a signal killed the init.
    pub signal: Option<i32>,
    /// When the shim collected the exit, in milliseconds since the Unix epoch.
    pub exited_at_unix_ms: u64,
    /// Output bytes the shim could not store in the log (disk full, ...).
    pub log_bytes_dropped: u64,
}

/// Reads the exit file at `path`; `None` when there is none (yet).
pub fn read_exit_file(path: &Path) -> io::Result<Option<ShimExit>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

/// Writes `exit` to `path` atomically and durably: `PATH.tmp`, fsync, rename
/// over `PATH`, fsync of the directory.
pub fn write_exit_file(path: &Path, exit: &ShimExit) -> io::Result<()> {
    let mut record = serde_json::to_vec(exit)?;
    record.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = Path::new(&temporary);
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(temporary)?;
    file.write_all(&record)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(temporary, path)?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_file_round_trips_and_leaves_no_temporary() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("exit.json");
        let exit = ShimExit {
            exit_code: Some(3),
            signal: None,
            exited_at_unix_ms: 1_790_000_000_000,
            log_bytes_dropped: 7,
        };
        write_exit_file(&path, &exit).unwrap();
        assert_eq!(read_exit_file(&path).unwrap(), Some(exit));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"exit_code\":3,\"signal\":null,\"exited_at_unix_ms\":1790000000000,\"log_bytes_dropped\":7}\n"
        );
        let names: Vec<_> =
            std::fs::read_dir(temp.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(names, ["exit.json"]);
    }

    #[test]
    fn a_second_write_replaces_the_record_whole() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("exit.json");
        let first = ShimExit {
            exit_code: Some(1_000_000),
            signal: None,
            exited_at_unix_ms: 1,
            log_bytes_dropped: 123_456_789,
        };
        let second =
            ShimExit { exit_code: None, signal: Some(9), exited_at_unix_ms: 2, log_bytes_dropped: 0 };
        write_exit_file(&path, &first).unwrap();
        write_exit_file(&path, &second).unwrap();
        assert_eq!(read_exit_file(&path).unwrap(), Some(second));
    }

    #[test]
    fn a_missing_exit_file_reads_as_none_and_a_torn_one_as_an_error() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("exit.json");
        assert_eq!(read_exit_file(&path).unwrap(), None);
        std::fs::write(&path, b"{\"exit_code\":3,").unwrap();
        let error = read_exit_file(&path).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
