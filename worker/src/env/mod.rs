//! Language environments: a task's packages (apt or apk, pip, npm, a
//! runtime) built once into a layer that is stacked on its image, and kept
//! by content.
//!
//! It owns `<data-dir>/environments/`: one directory per environment key,
//! `sha256(base image manifest digest + normalised spec)`, holding the
//! built `layer/` (an overlay upper directory, used as a lower layer from
//! then on), `meta.json` (written last: a directory without it is a build
//! that did not finish, and is removed) and `build.log`. It plans the build
//! (which package manager, which commands) and keeps the store: lookup,
//! leases (shared `flock`s on the layer, as the image store's snapshots
//! have) and least-recently-used eviction that never touches a leased
//! layer. Running the build (a container with network) is the
//! orchestrator's; this module knows nothing about NATS or the engine.
//!
//! Commands are argument vectors, never shell strings: every package name
//! has been checked by [`crate::protocol::Environment::normalize`] and is
//! one argument of the package manager (none may start with `-`).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::protocol::{NormalizedEnvironment, Runtime};

/// Where pip installs: a virtual environment inside the layer.
pub const VENV: &str = "/opt/quilt/venv";
/// Where npm installs: `node_modules` under this prefix.
pub const NODE_PREFIX: &str = "/opt/quilt/node";
/// Where the host's CA bundle is put for the build (removed from the layer after).
pub const BUILD_CA_BUNDLE: &str = "/etc/quilt-build/ca.pem";

/// Failures of the environment store and its planning.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The image has no package manager Quilt knows.
    #[error("the image has neither apt-get nor apk: cannot install packages into it")]
    NoPackageManager,
    /// Packages for the other package manager.
    #[error("the image uses {uses}; {given} packages cannot be installed into it")]
    WrongPackageManager {
        /// The image's.
        uses: &'static str,
        /// The list given.
        given: &'static str,
    },
    /// Reading or writing the store.
    #[error("environment store {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EnvError + '_ {
    move |source| EnvError::Io { path: path.to_path_buf(), source }
}

/// The image's package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageManager {
    /// Debian, Ubuntu.
    Apt,
    /// Alpine.
    Apk,
}

impl PackageManager {
    /// Looks for `apt-get` or `apk` in the image's layers (topmost first).
    pub fn detect(layers: &[PathBuf]) -> Option<PackageManager> {
        for layer in layers {
            for (path, manager) in [
                ("usr/bin/apt-get", PackageManager::Apt),
                ("sbin/apk", PackageManager::Apk),
                ("usr/sbin/apk", PackageManager::Apk),
            ] {
                // symlink_metadata: a layer's entries are never followed.
                if std::fs::symlink_metadata(layer.join(path)).is_ok() {
                    return Some(manager);
                }
            }
        }
        None
    }

    fn name(self) -> &'static str {
        match self {
            PackageManager::Apt => "apt",
            PackageManager::Apk => "apk",
        }
    }
}

/// One command of a build, with what it is for (shown in the build log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStep {
    /// What it does.
    pub what: &'static str,
    /// The argument vector.
    pub argv: Vec<String>,
}

fn step(what: &'static str, fixed: &[&str], packages: &[String]) -> BuildStep {
    let mut argv: Vec<String> = fixed.iter().map(|s| (*s).to_owned()).collect();
    argv.extend(packages.iter().cloned());
    BuildStep { what, argv }
}

/// The commands that build `environment` on an image whose package manager
/// is `manager`, in order.
pub fn plan(
    manager: PackageManager,
    environment: &NormalizedEnvironment,
) -> Result<Vec<BuildStep>, EnvError> {
    let (own, other) = match manager {
        PackageManager::Apt => (&environment.apt, &environment.apk),
        PackageManager::Apk => (&environment.apk, &environment.apt),
    };
    if !other.is_empty() {
        let given = match manager {
            PackageManager::Apt => "apk",
            PackageManager::Apk => "apt",
        };
        return Err(EnvError::WrongPackageManager { uses: manager.name(), given });
    }
    let mut system: Vec<String> = own.clone();
    for runtime in &environment.runtimes {
        let packages: &[&str] = match (runtime, manager) {
            (Runtime::Python3, PackageManager::Apt) => &["python3", "python3-venv"],
            (Runtime::Python3, PackageManager::Apk) => &["python3"],
            (Runtime::Node, _) => &["nodejs", "npm"],
        };
        system.extend(packages.iter().map(|name| (*name).to_owned()));
    }
    system.sort();
    system.dedup();
    let mut steps = Vec::new();
    if !system.is_empty() {
        match manager {
            PackageManager::Apt => {
                steps.push(step("apt: update the package lists", &["apt-get", "update", "-q"], &[]));
                steps.push(step(
                    "apt: install",
                    &["apt-get", "install", "-y", "-q", "--no-install-recommends"],
                    &system,
                ));
                steps.push(step("apt: clean the cache", &["apt-get", "clean"], &[]));
                steps.push(step(
                    "apt: remove the package lists",
                    &["find", "/var/lib/apt/lists", "-mindepth", "1", "-delete"],
                    &[],
                ));
            }
            PackageManager::Apk => {
                steps.push(step("apk: install", &["apk", "add", "--no-cache"], &system));
            }
        }
    }
    if !environment.pip.is_empty() {
        steps.push(step("pip: create the virtual environment", &["python3", "-m", "venv", VENV], &[]));
        steps.push(step(
            "pip: install",
            &[&format!("{VENV}/bin/pip"), "install", "--no-cache-dir", "--disable-pip-version-check"],
            &environment.pip,
        ));
    }
    if !environment.npm.is_empty() {
        steps.push(step("npm: make the prefix", &["mkdir", "-p", NODE_PREFIX], &[]));
        steps.push(step(
            "npm: install",
            &["npm", "install", "--prefix", NODE_PREFIX, "--no-audit", "--no-fund", "--no-update-notifier"],
            &environment.npm,
        ));
        steps.push(step("npm: clean the cache", &["npm", "cache", "clean", "--force"], &[]));
    }
    Ok(steps)
}

/// Environment variables a task running on the environment gets (before
/// its own): the venv's and node_modules' programs first on `PATH`.
pub fn runtime_env(environment: &NormalizedEnvironment, image_path: &str) -> Vec<(String, String)> {
    let mut path = Vec::new();
    let mut env = Vec::new();
    if !environment.pip.is_empty() {
        path.push(format!("{VENV}/bin"));
        env.push(("VIRTUAL_ENV".to_owned(), VENV.to_owned()));
    }
    if !environment.npm.is_empty() {
        path.push(format!("{NODE_PREFIX}/node_modules/.bin"));
        env.push(("NODE_PATH".to_owned(), format!("{NODE_PREFIX}/node_modules")));
    }
    if !path.is_empty() {
        let base = if image_path.is_empty() {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        } else {
            image_path
        };
        path.push(base.to_owned());
        env.push(("PATH".to_owned(), path.join(":")));
    }
    env
}

/// The key of `environment` on the image with manifest digest `base`.
pub fn key(base: &str, environment: &NormalizedEnvironment) -> String {
    let mut hasher = sha2::Sha256::new();
    hasher.update(base.as_bytes());
    hasher.update(b"\n");
    hasher.update(serde_json::to_vec(environment).unwrap_or_default());
    hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What is kept of a built environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentMeta {
    /// Its key.
    pub key: String,
    /// The image it was built on: name and manifest digest.
    pub image: String,
    /// The base manifest digest.
    pub base_digest: String,
    /// What it holds.
    pub spec: NormalizedEnvironment,
    /// Bytes of its layer.
    pub size: u64,
    /// How long the build took, milliseconds.
    pub build_ms: u64,
    /// When it was built and last used, seconds since the epoch.
    pub built_at: u64,
    /// Last use (for eviction), seconds since the epoch.
    pub last_used: u64,
}

/// A shared lock on an environment layer: eviction skips it while held.
#[derive(Debug)]
pub struct EnvLease {
    _lock: nix::fcntl::Flock<File>,
}

/// The environment store, `<data-dir>/environments`.
#[derive(Debug)]
pub struct EnvStore {
    dir: PathBuf,
    /// One build per key at a time in this process: later tasks wait on it.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// Bytes of the regular files under `path` (not following symlinks).
pub fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

impl EnvStore {
    /// Opens (creating) the store under `data_dir`, removing what
    /// unfinished builds left.
    pub fn open(data_dir: &Path) -> Result<EnvStore, EnvError> {
        let dir = data_dir.join("environments");
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let store = EnvStore { dir, building: Mutex::new(HashMap::new()) };
        for entry in std::fs::read_dir(&store.dir).map_err(io_error(&store.dir))?.flatten() {
            let path = entry.path();
            if path.is_dir() && !path.join("meta.json").exists() && !path.ends_with("failed") {
                tracing::info!(path = %path.display(), "removing an environment whose build did not finish");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(store)
    }

    /// The directory of environment `key`.
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Where the build log of a failed build of `key` is kept.
    pub fn failed_log(&self, key: &str) -> PathBuf {
        self.dir.join("failed").join(format!("{key}.log"))
    }

    /// The metadata of a finished environment.
    pub fn meta(&self, key: &str) -> Option<EnvironmentMeta> {
        let bytes = std::fs::read(self.entry_dir(key).join("meta.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every finished environment, most recently used first.
    pub fn list(&self) -> Vec<EnvironmentMeta> {
        let mut all: Vec<EnvironmentMeta> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.file_name().into_string().ok())
                    .filter_map(|name| self.meta(&name))
                    .collect()
            })
            .unwrap_or_default();
        all.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
        all
    }

    /// The per-key build lock: hold it while checking for and building `key`.
    pub fn build_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(building.entry(key.to_owned()).or_default())
    }

    /// Leases the layer of finished environment `key` and marks it used.
    pub fn lease(&self, key: &str) -> Result<Option<(PathBuf, EnvLease)>, EnvError> {
        let Some(mut meta) = self.meta(key) else { return Ok(None) };
        let layer = self.entry_dir(key).join("layer");
        let file = File::open(&layer).map_err(io_error(&layer))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockShared)
            .map_err(|(_, errno)| EnvError::Io { path: layer.clone(), source: errno.into() })?;
        meta.last_used = now_s();
        // Only orders eviction: not worth an fsync on every task's path.
        self.store_meta(&meta, false)?;
        Ok(Some((layer, EnvLease { _lock: lock })))
    }

    /// Takes a built layer (an overlay upper directory, on the store's
    /// file system) in as environment `meta.key`, with its build log.
    pub fn commit(&self, upper: &Path, log: &[u8], mut meta: EnvironmentMeta) -> Result<(), EnvError> {
        let dir = self.entry_dir(&meta.key);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let layer = dir.join("layer");
        std::fs::rename(upper, &layer).map_err(io_error(&layer))?;
        std::fs::write(dir.join("build.log"), log).map_err(io_error(&dir))?;
        meta.size = tree_size(&layer);
        // Last: its presence says the environment is complete.
        self.write_meta(&meta)
    }

    /// Keeps the log of a failed build (the newest per key).
    pub fn keep_failed_log(&self, key: &str, log: &[u8]) {
        let path = self.failed_log(key);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(path, log);
    }

    fn write_meta(&self, meta: &EnvironmentMeta) -> Result<(), EnvError> {
        self.store_meta(meta, true)
    }

    /// Replaces `meta.json` whole (write, rename); `durable` fsyncs first.
    fn store_meta(&self, meta: &EnvironmentMeta, durable: bool) -> Result<(), EnvError> {
        let path = self.entry_dir(&meta.key).join("meta.json");
        let temporary = path.with_extension("json.tmp");
        let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
        file.write_all(&serde_json::to_vec_pretty(meta).unwrap_or_default()).map_err(io_error(&temporary))?;
        if durable {
            file.sync_all().map_err(io_error(&temporary))?;
        }
        std::fs::rename(&temporary, &path).map_err(io_error(&path))
    }

    /// Removes least-recently-used environments until the store holds at
    /// most `budget` bytes; a leased one is never removed. Returns the keys
    /// removed.
    pub fn evict(&self, budget: u64) -> Vec<String> {
        let mut all = self.list();
        let mut total: u64 = all.iter().map(|meta| meta.size).sum();
        let mut removed = Vec::new();
        // Oldest use first.
        all.reverse();
        for meta in all {
            if total <= budget {
                break;
            }
            if self.remove_unleased(&meta.key) {
                total = total.saturating_sub(meta.size);
                removed.push(meta.key);
            }
        }
        removed
    }

    /// Removes environment `key` unless it is leased; true when removed.
    pub fn remove_unleased(&self, key: &str) -> bool {
        let dir = self.entry_dir(key);
        let layer = dir.join("layer");
        let Ok(file) = File::open(&layer) else { return false };
        // An exclusive lock that cannot be had means a task uses it.
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            return false;
        };
        // meta.json first: a half-removed directory is an unfinished one.
        let _ = std::fs::remove_file(dir.join("meta.json"));
        let removed = std::fs::remove_dir_all(&dir).is_ok();
        drop(lock);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Environment;

    fn normal(environment: Environment) -> NormalizedEnvironment {
        environment.normalize().unwrap()
    }

    #[test]
    fn apt_plan_installs_runtimes_and_packages_then_cleans() {
        let environment = normal(Environment {
            apt: vec!["curl".into()],
            pip: vec!["six==1.16.0".into()],
            ..Environment::default()
        });
        let steps = plan(PackageManager::Apt, &environment).unwrap();
        let argvs: Vec<Vec<&str>> =
            steps.iter().map(|s| s.argv.iter().map(String::as_str).collect()).collect();
        assert_eq!(argvs[0], ["apt-get", "update", "-q"]);
        assert_eq!(
            argvs[1],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "curl", "python3", "python3-venv"]
        );
        assert_eq!(argvs[2], ["apt-get", "clean"]);
        assert_eq!(argvs[3], ["find", "/var/lib/apt/lists", "-mindepth", "1", "-delete"]);
        assert_eq!(argvs[4], ["python3", "-m", "venv", VENV]);
        assert_eq!(
            argvs[5],
            [
                "/opt/quilt/venv/bin/pip",
                "install",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "six==1.16.0"
            ]
        );
        assert_eq!(steps.len(), 6);
    }

    #[test]
    fn apk_plan_for_alpine_images() {
        let environment = normal(Environment {
            apk: vec!["curl".into()],
            npm: vec!["is-number@7.0.0".into()],
            ..Environment::default()
        });
        let steps = plan(PackageManager::Apk, &environment).unwrap();
        let argvs: Vec<Vec<&str>> =
            steps.iter().map(|s| s.argv.iter().map(String::as_str).collect()).collect();
        assert_eq!(argvs[0], ["apk", "add", "--no-cache", "curl", "nodejs", "npm"]);
        assert_eq!(argvs[1], ["mkdir", "-p", NODE_PREFIX]);
        assert_eq!(
            argvs[2],
            [
                "npm",
                "install",
                "--prefix",
                NODE_PREFIX,
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
                "is-number@7.0.0"
            ]
        );
        assert_eq!(argvs[3], ["npm", "cache", "clean", "--force"]);
        let python = normal(Environment { pip: vec!["six".into()], ..Environment::default() });
        let argvs: Vec<Vec<String>> =
            plan(PackageManager::Apk, &python).unwrap().into_iter().map(|s| s.argv).collect();
        assert_eq!(argvs[0], ["apk", "add", "--no-cache", "python3"]);
    }

    #[test]
    fn packages_for_the_other_manager_are_refused() {
        let environment = normal(Environment { apk: vec!["curl".into()], ..Environment::default() });
        assert!(matches!(plan(PackageManager::Apt, &environment), Err(EnvError::WrongPackageManager { .. })));
    }

    #[test]
    fn keys_depend_on_the_base_and_the_normalised_spec_only() {
        let a = normal(Environment { pip: vec!["six".into(), "attrs".into()], ..Environment::default() });
        let b = normal(Environment {
            pip: vec!["attrs".into(), "six".into(), "six".into()],
            ..Environment::default()
        });
        let c = normal(Environment { pip: vec!["six".into()], ..Environment::default() });
        assert_eq!(key("sha256:1", &a), key("sha256:1", &b));
        assert_ne!(key("sha256:1", &a), key("sha256:2", &a));
        assert_ne!(key("sha256:1", &a), key("sha256:1", &c));
    }

    #[test]
    fn runtime_env_puts_the_venv_and_node_bins_first() {
        let environment = normal(Environment {
            pip: vec!["six".into()],
            npm: vec!["is-number".into()],
            ..Environment::default()
        });
        let env = runtime_env(&environment, "/usr/bin:/bin");
        assert!(env.contains(&(
            "PATH".to_owned(),
            "/opt/quilt/venv/bin:/opt/quilt/node/node_modules/.bin:/usr/bin:/bin".to_owned()
        )));
        assert!(env.contains(&("NODE_PATH".to_owned(), "/opt/quilt/node/node_modules".to_owned())));
    }

    fn meta(key: &str, size: u64, last_used: u64) -> EnvironmentMeta {
        EnvironmentMeta {
            key: key.into(),
            image: "busybox".into(),
            base_digest: "sha256:1".into(),
            spec: NormalizedEnvironment::default(),
            size,
            build_ms: 1,
            built_at: 1,
            last_used,
        }
    }

    #[test]
    fn eviction_removes_the_least_recently_used_and_never_a_leased_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = EnvStore::open(dir.path()).unwrap();
        for (key, used) in [("old", 1), ("mid", 2), ("new", 3)] {
            let upper = dir.path().join(format!("upper-{key}"));
            std::fs::create_dir_all(&upper).unwrap();
            std::fs::write(upper.join("file"), vec![0u8; 1000]).unwrap();
            store.commit(&upper, b"log", meta(key, 0, used)).unwrap();
        }
        assert_eq!(store.list().iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["new", "mid", "old"]);
        // "old" is in use: it stays, and "mid" goes instead.
        let (_, lease) = {
            // A lease marks it used now; restore its age for the test.
            let leased = store.lease("old").unwrap().unwrap();
            let mut aged = store.meta("old").unwrap();
            aged.last_used = 1;
            store.write_meta(&aged).unwrap();
            leased
        };
        assert_eq!(store.evict(2500), ["mid"]);
        assert!(store.meta("old").is_some() && store.meta("new").is_some());
        drop(lease);
        assert_eq!(store.evict(1500), ["old"]);
        assert_eq!(store.evict(0), ["new"]);
        assert!(store.list().is_empty());
    }

    #[test]
    fn unfinished_builds_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("environments/abc/layer")).unwrap();
        let store = EnvStore::open(dir.path()).unwrap();
        assert!(!store.entry_dir("abc").exists());
    }
}
