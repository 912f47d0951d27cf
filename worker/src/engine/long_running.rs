//! Long-running containers: started once, kept running across restarts of
//! the worker, and re-adopted by the next one.
//!
//! A worker's own children die with it, or at least lose the parent that
//! would learn how they ended. So a long-running container's first process
//! (its "init") is not the worker's child but the child of a small
//! host-side process of its own, the shim (`quilt-shim`, see
//! [`crate::shim`]). The worker clones an intermediate process that clones
//! the init into its namespaces and then execs the shim; the shim copies the
//! init's output into rotated log files under `<state>/<id>/logs/`, waits
//! for it, and writes how it ended to `<state>/<id>/exit-<run>.json` before
//! it exits. The init gets `PR_SET_PDEATHSIG` SIGKILL, so it never outlives
//! its shim unobserved.
//!
//! What the worker records of a run ([`RunIdentity`]) is each process's pid
//! *and* start time (field 22 of `/proc/<pid>/stat`): [`Engine::adopt`]
//! opens a pidfd and then checks the start time, so a pid reused by another
//! process is never mistaken for the container. A shim that is gone left
//! either its exit file ([`RunEnd::Exited`], the status the kernel gave it)
//! or, if it was itself killed, nothing ([`RunEnd::Lost`]); the state is
//! never guessed.
//!
//! The container's cgroup `<id>` carries its limits; the init lives in the
//! leaf `<id>/init` and each exec in `<id>/<exec id>` (cgroup v2 allows
//! processes only in leaves once controllers are delegated). The writable
//! layer is on disk (`<state>/<id>/upper`) and survives restarts of the
//! container; [`Engine::reap`] removes everything.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::cgroup::{CgroupController, CgroupLimits};
use super::child::{self, ChildDescriptors, ChildPlan, ShimLaunch};
use super::spec::NetworkMode;
use super::{
    pipe, read_setup_report, root_paths, seccomp, sys, ContainerSpec, DiskLayout, Engine, EngineError,
    ExitStatus,
};

/// How long-running containers are run.
#[derive(Debug, Clone)]
pub struct LongRunningConfig {
    /// The `quilt-shim` program.
    pub shim: PathBuf,
    /// A log segment is closed at this size and a new one started.
    pub log_segment_bytes: u64,
    /// Segments kept per container; older ones are deleted.
    pub log_segments: u32,
}

/// A process as recorded in the event log: its pid and its start time in
/// clock ticks after boot, which together name one process for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProcessIdentity {
    /// Host pid.
    pub pid: i32,
    /// `/proc/<pid>/stat` field 22.
    pub start_ticks: u64,
}

/// One run of a long-running container (it is run again after each restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunIdentity {
    /// Counts the container's runs from 1.
    pub run: u32,
    /// The container's first process.
    pub init: ProcessIdentity,
    /// Its shim.
    pub shim: ProcessIdentity,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The first process ended with this status, as its shim recorded it.
    Exited {
        /// The status.
        status: ExitStatus,
        /// When, in milliseconds since the Unix epoch.
        exited_at_unix_ms: u64,
    },
    /// The shim is gone without a record (it was killed; its init was
    /// killed with it by the parent-death signal).
    Lost,
}

/// What [`Engine::adopt`] found.
pub enum Adoption {
    /// The run goes on; here is its handle.
    Running(LongRunning),
    /// The run ended while nobody was watching.
    Ended(RunEnd),
}

/// A running long-running container.
pub struct LongRunning {
    engine: Engine,
    id: String,
    identity: RunIdentity,
    /// The first process; `None` once it is known to be gone.
    init: Option<OwnedFd>,
    shim: AsyncFd<OwnedFd>,
}

impl std::fmt::Debug for LongRunning {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LongRunning").field("id", &self.id).field("identity", &self.identity).finish()
    }
}

/// The start time of process `pid`, or None when there is no such process.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything,
    // ')' included: fields resume after the last ')'.
    let after = stat.iter().rposition(|byte| *byte == b')')?;
    let rest = std::str::from_utf8(&stat[after + 1..]).ok()?;
    // Field 3 is the first after the name; 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd of `expected`, if that very process still exists.
fn open_identified(expected: &ProcessIdentity) -> Option<OwnedFd> {
    let pidfd = sys::pidfd_open(expected.pid).ok()?;
    // Checked after opening: the pidfd pins whichever process had the pid;
    // if that is a later one, its start time differs.
    (start_ticks(expected.pid) == Some(expected.start_ticks)).then_some(pidfd)
}

fn c_string(bytes: &[u8]) -> CString {
    // Paths and numbers we build; none holds a NUL.
    CString::new(bytes).unwrap_or_default()
}

impl Engine {
    /// The directory of long-running container `id`: writable layer, logs,
    /// exit records.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.shared.config.state_dir.join(id)
    }

    /// Where the logs of long-running container `id` are.
    pub fn logs_dir(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("logs")
    }

    fn exit_file(&self, id: &str, run: u32) -> PathBuf {
        self.container_dir(id).join(format!("exit-{run}.json"))
    }

    /// Starts run `run` of long-running container `spec.id` (whose scratch
    /// must be on disk, so its files persist between runs), returning once
    /// its command has been exec'd or with the failed setup step. The
    /// cgroup and directory are made on the first run and reused after.
    pub async fn start_long_running(
        &self,
        spec: ContainerSpec,
        run: u32,
        config: &LongRunningConfig,
    ) -> Result<LongRunning, EngineError> {
        spec.validate(&self.shared.machine)?;
        self.check_mapped(&spec)?;
        let dir = self.container_dir(&spec.id);
        let layout = match self.disk_layout(&spec) {
            // Made by a Quilt without disk layers of their own: its files
            // stay where they are.
            Some(DiskLayout::OwnFilesystem)
                if dir.join("upper").exists() && !dir.join(super::disk_layer::IMAGE).exists() =>
            {
                Some(DiskLayout::Directory)
            }
            layout => layout,
        };
        if layout.is_none() && !spec.root.read_only {
            return Err(EngineError::State("long-running containers keep their writes on disk"));
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|source| EngineError::StateDirectory { path: logs, source })?;
        if let Some(layout) = layout {
            self.make_disk_layer(&dir, layout, &spec.limits)?;
        }
        let cgroups = &self.shared.cgroups;
        let container_cgroup = match cgroups.open_existing(&spec.id) {
            Some(cgroup) => cgroup,
            None => cgroups.create(
                &spec.id,
                &CgroupLimits {
                    memory_bytes: Some(spec.limits.memory_bytes)
                        .filter(|_| self.enforces(CgroupController::Memory)),
                    cpu_millis: spec.limits.cpu_millis.filter(|_| self.enforces(CgroupController::Cpu)),
                    pids: Some(spec.limits.pids).filter(|_| self.enforces(CgroupController::Pids)),
                },
            )?,
        };
        // The previous run's leaf, if any, is empty now (its init is dead and
        // the pid namespace died with it); a fresh one starts clean.
        let leaf_name = format!("{}/init", spec.id);
        if let Some(old) = cgroups.open_existing(&leaf_name) {
            old.kill_all()?;
            old.delete()?;
        }
        let leaf = cgroups.create(&leaf_name, &CgroupLimits::default())?;
        drop(container_cgroup);
        let exit_file = self.exit_file(&spec.id, run);
        match std::fs::remove_file(&exit_file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EngineError::StateDirectory { path: exit_file, source }),
        }

        let (output_read, output_write) = pipe()?;
        let (report_read, report_write) = pipe()?;
        let (hold_read, hold_write) = pipe()?;
        let null: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(EngineError::Output)?
            .into();
        let shim_log_path = dir.join("shim.log");
        let shim_log: OwnedFd = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&shim_log_path)
            .map_err(|source| EngineError::StateDirectory { path: shim_log_path, source })?
            .into();
        let attach = leaf.attach_files()?;
        let paths =
            root_paths(&self.shared.config.state_dir, layout.map(|layout| (dir.as_path(), layout)), &spec);
        // Closed once the setup process has moved it into place (or failed).
        let disk_mount = match layout {
            Some(DiskLayout::OwnFilesystem) => Some(self.mount_disk_layer(&dir)?),
            _ => None,
        };
        let mut namespaces = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if spec.network == NetworkMode::None {
            namespaces |= libc::CLONE_NEWNET;
        }
        let arguments: Vec<CString> = [
            config.shim.as_os_str().as_bytes(),
            b"--log-dir",
            dir.join("logs").as_os_str().as_bytes(),
            b"--exit-file",
            exit_file.as_os_str().as_bytes(),
            b"--segment-bytes",
            config.log_segment_bytes.to_string().as_bytes(),
            b"--segments",
            config.log_segments.to_string().as_bytes(),
        ]
        .iter()
        .map(|argument| c_string(argument))
        .collect();
        // The plan and launch hold raw pointers: they live in this block only,
        // so the future stays Send.
        let spawned = {
            let mut plan = ChildPlan::prepare(
                &spec,
                &paths,
                ChildDescriptors {
                    stdin: null.as_raw_fd(),
                    stdout: output_write.as_raw_fd(),
                    stderr: output_write.as_raw_fd(),
                    report: report_write.as_raw_fd(),
                    cgroup_tasks: attach.iter().map(|fd| fd.as_raw_fd()).collect(),
                },
                seccomp::sock_fprog(&self.shared.seccomp).map_err(EngineError::Seccomp)?,
                self.shared.last_capability,
            );
            plan.die_with_parent = true;
            if let Some(mount) = &disk_mount {
                plan.set_disk_mount(mount.as_raw_fd());
            }
            plan.user_namespace = self.userns_plan(&spec);
            let mut argv: Vec<*const libc::c_char> =
                arguments.iter().map(|argument| argument.as_ptr()).collect();
            argv.push(std::ptr::null());
            let launch = ShimLaunch {
                plan: &plan,
                namespaces,
                init_stack: sys::ChildStack::new(child::CHILD_STACK_SIZE).map_err(EngineError::Clone)?,
                program: arguments[0].clone(),
                argv,
                envp: vec![std::ptr::null()],
                output: output_read.as_raw_fd(),
                hold: hold_read.as_raw_fd(),
                null: null.as_raw_fd(),
                shim_log: shim_log.as_raw_fd(),
                init_pid: std::sync::atomic::AtomicI32::new(0),
            };
            child::spawn_with_shim(&launch)
        }
        .map_err(EngineError::Clone)?;
        drop((output_read, output_write, report_write, hold_read, null, shim_log, attach));
        let shim_pid = spawned.shim.pid;
        let shim_pidfd = spawned.shim.pidfd;
        let report = read_setup_report(report_read).await?;
        drop(disk_mount);
        if let Some(error) = report {
            // The init failed (the shim records its exit; release it so it
            // can) or the shim never started; either way, wait it out.
            drop(hold_write);
            let shim = sys::register_pidfd(shim_pidfd).map_err(EngineError::Wait)?;
            wait_readable(&shim).await?;
            sys::reap_pidfd(shim.get_ref().as_raw_fd());
            let _ = std::fs::remove_file(&exit_file);
            let _ = leaf.delete();
            return Err(error);
        }
        // The init cannot be reaped (so its pid cannot be reused) until the
        // hold is released: read both identities first.
        let init_pid = spawned.init_pid;
        let init = sys::pidfd_open(init_pid).map_err(|errno| EngineError::Wait(errno.into()))?;
        let identity = RunIdentity {
            run,
            init: ProcessIdentity {
                pid: init_pid,
                start_ticks: start_ticks(init_pid).ok_or(EngineError::SetupLost("init vanished".into()))?,
            },
            shim: ProcessIdentity {
                pid: shim_pid,
                start_ticks: start_ticks(shim_pid).ok_or(EngineError::SetupLost("shim vanished".into()))?,
            },
        };
        sys::write_all_raw(hold_write.as_raw_fd(), b"1").map_err(|errno| EngineError::Wait(errno.into()))?;
        drop(hold_write);
        Ok(LongRunning {
            engine: self.clone(),
            id: spec.id,
            identity,
            init: Some(init),
            shim: sys::register_pidfd(shim_pidfd).map_err(EngineError::Wait)?,
        })
    }

    /// Finds run `identity` of container `id` again after a restart of the
    /// worker: still running, or how it ended.
    pub fn adopt(&self, id: &str, identity: &RunIdentity) -> Result<Adoption, EngineError> {
        super::validate_id(id)?;
        match open_identified(&identity.shim) {
            Some(shim) => Ok(Adoption::Running(LongRunning {
                engine: self.clone(),
                id: id.to_owned(),
                identity: *identity,
                // A shim without its init is finishing: `wait` will say how.
                init: open_identified(&identity.init),
                shim: sys::register_pidfd(shim).map_err(EngineError::Wait)?,
            })),
            None => Ok(Adoption::Ended(self.read_run_end(id, identity.run)?)),
        }
    }

    fn read_run_end(&self, id: &str, run: u32) -> Result<RunEnd, EngineError> {
        let path = self.exit_file(id, run);
        let exit = crate::shim::read_exit_file(&path)
            .map_err(|source| EngineError::StateDirectory { path: path.clone(), source })?;
        Ok(match exit {
            Some(exit) => RunEnd::Exited {
                status: match (exit.exit_code, exit.signal) {
                    (Some(code), _) => ExitStatus::Exited(code),
                    (None, Some(signal)) => ExitStatus::Signaled(signal),
                    (None, None) => return Ok(RunEnd::Lost),
                },
                exited_at_unix_ms: exit.exited_at_unix_ms,
            },
            None => RunEnd::Lost,
        })
    }

    /// Kills and removes the exec cgroups of container `id` (every
    /// sub-cgroup but its first process's leaf): execs a crashed worker
    /// left running. Returns how many there were.
    pub fn reap_execs(&self, id: &str) -> Result<usize, EngineError> {
        super::validate_id(id)?;
        let cgroups = &self.shared.cgroups;
        let mut count = 0;
        for child in cgroups.children(id).into_iter().filter(|child| child != "init") {
            if let Some(cgroup) = cgroups.open_existing(&format!("{id}/{child}")) {
                cgroup.kill_all()?;
                cgroup.delete()?;
                count += 1;
            }
        }
        Ok(count)
    }

    fn enforces(&self, controller: CgroupController) -> bool {
        self.shared.config.unavailable_limits == super::UnavailableLimits::Refuse
            || self.shared.cgroups.has_controller(controller)
    }
}

async fn wait_readable(pidfd: &AsyncFd<OwnedFd>) -> Result<(), EngineError> {
    // A pidfd is readable once its process has exited, for good.
    let _ready = pidfd.readable().await.map_err(EngineError::Wait)?;
    Ok(())
}

impl LongRunning {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What to record so a later worker can adopt this run.
    pub fn identity(&self) -> RunIdentity {
        self.identity
    }

    /// The pidfd of the first process, while it is known to run.
    pub(super) fn init_pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.init.as_ref().map(AsFd::as_fd)
    }

    /// Waits until the run ends (the shim exits) and says how.
    pub async fn wait(&self) -> Result<RunEnd, EngineError> {
        wait_readable(&self.shim).await?;
        // Our child when we started it; after a restart, init's.
        sys::reap_pidfd(self.shim.get_ref().as_raw_fd());
        let end = self.engine.read_run_end(&self.id, self.identity.run)?;
        if let Some(leaf) = self.engine.shared.cgroups.open_existing(&format!("{}/init", self.id)) {
            // Empty by now: the pid namespace died with its first process.
            if let Err(error) = leaf.kill_all().and_then(|()| leaf.delete()) {
                tracing::warn!(container = %self.id, %error, "cannot remove the leaf cgroup of an ended run");
            }
        }
        Ok(end)
    }

    /// Sends `signal` to the first process (nothing if it is gone).
    pub fn signal(&self, signal: i32) -> Result<(), EngineError> {
        let Some(init) = &self.init else {
            return Ok(());
        };
        match sys::pidfd_send_signal(init.as_raw_fd(), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(EngineError::Kill(errno)),
        }
    }

    /// SIGKILLs every process of the container, execs included.
    pub fn kill_all(&self) -> Result<(), EngineError> {
        self.signal(libc::SIGKILL)?;
        match self.engine.shared.cgroups.open_existing(&self.id) {
            Some(cgroup) => cgroup.kill_all().map_err(EngineError::from),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_this_process_is_stable_and_of_no_process_is_none() {
        let own = i32::try_from(std::process::id()).unwrap();
        let first = start_ticks(own).expect("own stat");
        assert_eq!(start_ticks(own), Some(first));
        assert_eq!(start_ticks(i32::MAX), None);
    }

    #[test]
    fn a_pid_with_another_start_time_is_not_identified() {
        let own = i32::try_from(std::process::id()).unwrap();
        let ticks = start_ticks(own).unwrap();
        assert!(open_identified(&ProcessIdentity { pid: own, start_ticks: ticks }).is_some());
        assert!(open_identified(&ProcessIdentity { pid: own, start_ticks: ticks + 1 }).is_none());
    }
}
