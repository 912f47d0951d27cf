//! OCI runtime bundles: a directory with `config.json` and a root
//! filesystem, read with oci-spec and turned into a [`ContainerSpec`].
//!
//! What is honoured: `root.path` and `root.readonly`; `process.args`, `env`,
//! `cwd`, `user` (uid, gid, additionalGids), `capabilities`, `rlimits`;
//! `hostname`; `linux.namespaces` (a `network` entry means a fresh network
//! namespace, its absence means the host's; pid, mount, uts, ipc and cgroup
//! namespaces are always fresh); `linux.resources` memory limit, cpu
//! quota/period and pids limit. Quilt always applies its own standard mounts
//! (/proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys), masked and
//! read-only paths, no_new_privs and seccomp filter. Anything the engine
//! cannot honour faithfully (extra mounts, joining existing namespaces, user
//! namespaces, hooks, a terminal) is refused with an error naming it rather
//! than silently ignored.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::capabilities::{mask_of, Capability, CapabilitySet};
use super::spec::{ContainerSpec, Limits, NetworkMode, Rlimit, User};

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// config.json missing or malformed.
    #[error("reading {path}: {source}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// oci-spec's error.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A required field is absent.
    #[error("bundle config.json has no {0}")]
    Missing(&'static str),
    /// A field the engine cannot honour.
    #[error("bundle config.json: {0} is not supported by Quilt")]
    Unsupported(String),
    /// A malformed value.
    #[error("bundle config.json: invalid {0}")]
    Invalid(String),
}

/// Standard mounts the engine provides itself; a bundle listing them is fine.
const STANDARD_MOUNTS: &[&str] =
    &["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"];

/// Read `<bundle>/config.json` into a spec for container `id`.
pub fn load_bundle(bundle: &Path, id: &str) -> Result<ContainerSpec, BundleError> {
    let path = bundle.join("config.json");
    let config = Spec::load(&path).map_err(|source| BundleError::Config { path: path.clone(), source })?;

    let root = config.root().as_ref().ok_or(BundleError::Missing("root"))?;
    let root_path = if root.path().is_absolute() { root.path().clone() } else { bundle.join(root.path()) };
    let root_path = root_path.canonicalize().unwrap_or(root_path);
    let process = config.process().as_ref().ok_or(BundleError::Missing("process"))?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(BundleError::Missing("process.args"));
    }
    if process.terminal().unwrap_or(false) {
        return Err(BundleError::Unsupported("process.terminal".into()));
    }
    if config.hooks().is_some() {
        return Err(BundleError::Unsupported("hooks".into()));
    }
    for mount in config.mounts().iter().flatten() {
        let destination = mount.destination().to_string_lossy();
        if !STANDARD_MOUNTS.contains(&destination.as_ref()) {
            return Err(BundleError::Unsupported(format!("mount {destination}")));
        }
    }

    let mut env = Vec::new();
    for entry in process.env().iter().flatten() {
        let (name, value) =
            entry.split_once('=').ok_or_else(|| BundleError::Invalid(format!("env entry {entry:?}")))?;
        env.push((name.to_owned(), value.to_owned()));
    }

    let user = process.user();
    let mut spec = ContainerSpec::new(id, vec![root_path], args);
    spec.root.read_only = root.readonly().unwrap_or(false);
    spec.env = env;
    spec.workdir = process.cwd().to_string_lossy().into_owned();
    spec.user = User {
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
    };
    if let Some(hostname) = config.hostname() {
        spec.hostname = hostname.clone();
    }
    if let Some(capabilities) = process.capabilities() {
        let mask = |set: &Option<oci_spec::runtime::Capabilities>| -> Result<u64, BundleError> {
            let mut caps = Vec::new();
            for cap in set.iter().flatten() {
                let name = cap.to_string();
                caps.push(
                    Capability::parse(&name)
                        .ok_or_else(|| BundleError::Invalid(format!("capability {name}")))?,
                );
            }
            Ok(mask_of(caps))
        };
        spec.capabilities = CapabilitySet {
            bounding: mask(capabilities.bounding())?,
            effective: mask(capabilities.effective())?,
            permitted: mask(capabilities.permitted())?,
            inheritable: mask(capabilities.inheritable())?,
            ambient: mask(capabilities.ambient())?,
        };
    }
    if let Some(rlimits) = process.rlimits() {
        spec.rlimits = rlimits
            .iter()
            .map(|limit| {
                let name = serde_json::to_value(limit.typ())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let resource =
                    rlimit_number(&name).ok_or_else(|| BundleError::Invalid(format!("rlimit {name}")))?;
                Ok(Rlimit { resource, soft: limit.soft(), hard: limit.hard() })
            })
            .collect::<Result<_, BundleError>>()?;
    }

    spec.network = NetworkMode::Host;
    if let Some(linux) = config.linux() {
        for namespace in linux.namespaces().iter().flatten() {
            if namespace.path().is_some() {
                return Err(BundleError::Unsupported(format!(
                    "joining an existing {:?} namespace",
                    namespace.typ()
                )));
            }
            match namespace.typ() {
                LinuxNamespaceType::Network => spec.network = NetworkMode::None,
                LinuxNamespaceType::User => return Err(BundleError::Unsupported("user namespace".into())),
                _ => {}
            }
        }
        if let Some(resources) = linux.resources() {
            spec.limits = limits_from(resources, spec.limits)?;
        }
    }
    Ok(spec)
}

fn limits_from(
    resources: &oci_spec::runtime::LinuxResources,
    mut limits: Limits,
) -> Result<Limits, BundleError> {
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
        limits.memory_bytes =
            u64::try_from(limit).map_err(|_| BundleError::Invalid(format!("memory limit {limit}")))?;
        limits.shm_bytes = limits.shm_bytes.min(limits.memory_bytes);
        limits.scratch_bytes = limits.scratch_bytes.min(limits.memory_bytes);
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(quota) = cpu.quota().filter(|q| *q > 0) {
            let period = cpu.period().unwrap_or(100_000).max(1);
            limits.cpu_millis = Some((quota as u64).saturating_mul(1000) / period);
        }
    }
    if let Some(pids) = resources.pids() {
        let limit = pids.limit();
        limits.pids =
            u64::try_from(limit).map_err(|_| BundleError::Invalid(format!("pids limit {limit}")))?;
    }
    Ok(limits)
}

// RLIMIT_* are u32 on glibc and c_int on musl (Alpine): the cast is needed there.
#[allow(clippy::unnecessary_cast)]
fn rlimit_number(name: &str) -> Option<u32> {
    let number = match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    };
    Some(number as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    const MINIMAL: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {"cwd": "/tmp", "args": ["/bin/echo", "hi"], "env": ["A=1", "PATH=/bin"],
                    "user": {"uid": 1000, "gid": 1000},
                    "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}]},
        "hostname": "box",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}],
                  "resources": {"memory": {"limit": 67108864}, "cpu": {"quota": 50000, "period": 100000},
                                "pids": {"limit": 32}}}
    }"#;

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn reads_a_bundle() {
        let dir = bundle(MINIMAL);
        let spec = load_bundle(dir.path(), "b1").unwrap();
        assert_eq!(spec.command, vec!["/bin/echo", "hi"]);
        assert!(spec.root.read_only);
        assert_eq!(spec.root.layers[0], dir.path().join("rootfs").canonicalize().unwrap());
        assert_eq!(spec.workdir, "/tmp");
        assert_eq!(spec.user.uid, 1000);
        assert_eq!(spec.hostname, "box");
        assert_eq!(spec.network, NetworkMode::None);
        assert_eq!(spec.limits.memory_bytes, 64 << 20);
        assert_eq!(spec.limits.cpu_millis, Some(500));
        assert_eq!(spec.limits.pids, 32);
        assert_eq!(spec.capabilities.effective, 1 << 5);
        assert_eq!(spec.rlimits, vec![Rlimit { resource: libc::RLIMIT_NOFILE as u32, soft: 32, hard: 64 }]);
        assert!(spec.env.contains(&("A".into(), "1".into())));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let extra_mount = MINIMAL.replace("\"/proc\"", "\"/data\"");
        assert!(matches!(load_bundle(bundle(&extra_mount).path(), "b"), Err(BundleError::Unsupported(_))));
        let user_ns = MINIMAL.replace("{\"type\": \"pid\"}", "{\"type\": \"user\"}");
        assert!(matches!(load_bundle(bundle(&user_ns).path(), "b"), Err(BundleError::Unsupported(_))));
        let malformed = bundle("{ not json");
        let error = load_bundle(malformed.path(), "b").unwrap_err();
        assert!(error.to_string().contains("config.json"), "{error}");
        let no_args = MINIMAL.replace("\"args\": [\"/bin/echo\", \"hi\"],", "");
        assert!(load_bundle(bundle(&no_args).path(), "b").is_err());
    }
}
