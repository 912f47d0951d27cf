//! The service files of `deploy/` as an operator installs them. The systemd
//! units pass `systemd-analyze verify` with the real binaries; the OpenRC
//! scripts parse under dash and busybox ash, start the same command lines as
//! the units and export every setting of their env file to the process they
//! start; `deploy/quilt.env` names exactly the variables of `quilt worker
//! --help`, with its defaults, and `deploy/leaf.env` exactly those
//! `broker-config/leaf.conf` references. Then a leaf node and a worker run
//! the way their units start them: the unit's command line, the env file's
//! environment and nothing else, stopped by SIGTERM within the unit's
//! `TimeoutStopSec`. The worker drains a running task, and the shim of its
//! long-running container stays in the worker's cgroup after the worker has
//! exited (which is why the unit has `KillMode=process`) until the next
//! worker re-adopts the container.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::engine::parse_duration;
use quilt_tests::pipeline::{assert_worker_left_nothing, task, Agent, LongRunningGuard, Setup, BOUND};
use quilt_tests::{assert_ok, quilt_binary, text, which, TestDir};
use serde_json::{json, Value};

/// The PATH systemd gives system services (systemd.exec(5), "Environment
/// Variables in Spawned Processes"): the only variable the worker gets
/// besides its env file.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The unit directories of the host's own units, loaded by `systemd-analyze
/// verify` as dependencies (network-online.target, multi-user.target).
const HOST_UNIT_DIRECTORIES: [&str; 4] =
    ["/etc/systemd/", "/run/systemd/", "/lib/systemd/", "/usr/lib/systemd/"];

fn repository_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn read(relative: &str) -> String {
    let path = repository_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// A systemd unit file of `deploy/systemd`.
struct Unit {
    name: &'static str,
    text: String,
}

impl Unit {
    fn load(name: &'static str) -> Unit {
        Unit { name, text: read(&format!("deploy/systemd/{name}")) }
    }

    /// Every value of `key`, in order (sections do not matter: no key here
    /// is used in two).
    fn values(&self, key: &str) -> Vec<String> {
        self.text
            .lines()
            .map(str::trim)
            .filter(|line| !line.starts_with('#') && !line.starts_with(';'))
            .filter_map(|line| line.split_once('='))
            .filter(|(name, _)| name.trim() == key)
            .map(|(_, value)| value.trim().to_owned())
            .collect()
    }

    /// The one value of `key`.
    fn value(&self, key: &str) -> String {
        let values = self.values(key);
        assert_eq!(values.len(), 1, "{}: {key}= set {} times", self.name, values.len());
        values.into_iter().next().unwrap()
    }

    /// The words of every `key=` line (dependency lists).
    fn words(&self, key: &str) -> BTreeSet<String> {
        self.values(key).iter().flat_map(|value| value.split_whitespace()).map(str::to_owned).collect()
    }

    /// `TimeoutStopSec=` (plain seconds or with a unit).
    fn stop_timeout(&self) -> Duration {
        let value = self.value("TimeoutStopSec");
        parse_duration(&value).unwrap_or_else(|| panic!("{}: TimeoutStopSec={value}", self.name))
    }

    /// `ExecStart=` as an argument vector.
    fn exec_start(&self) -> Vec<String> {
        self.value("ExecStart").split_whitespace().map(str::to_owned).collect()
    }

    /// The text with the line `old` (which must be there once) replaced by `new`.
    fn with_line(&self, old: &str, new: &str) -> String {
        let count = self.text.lines().filter(|line| *line == old).count();
        assert_eq!(count, 1, "{}: the line {old:?} is there {count} times", self.name);
        self.text.lines().map(|line| if line == old { new } else { line }).collect::<Vec<_>>().join("\n")
            + "\n"
    }
}

/// The assignments of an env file as systemd's `EnvironmentFile=` and sh's
/// `.` both read it, in order. Only the subset on which the two agree is
/// accepted: `NAME=value` lines, `#` comments, blank lines, and values
/// without quotes, spaces, backslashes or anything sh would expand.
fn parse_env_file(path: &Path) -> Vec<(String, String)> {
    let content = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut settings = Vec::new();
    for (number, line) in content.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let place = format!("{}:{}", path.display(), number + 1);
        let (name, value) =
            line.split_once('=').unwrap_or_else(|| panic!("{place}: not NAME=value: {line:?}"));
        let name_ok = name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
            && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        assert!(name_ok, "{place}: not a variable name: {name:?}");
        let value_ok = value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@,=+".contains(c));
        assert!(value_ok, "{place}: systemd and sh could read {value:?} differently");
        settings.push((name.to_owned(), value.to_owned()));
    }
    settings
}

/// The environment an env file gives a service (a later line wins, as in
/// systemd and sh).
fn environment_of(path: &Path) -> BTreeMap<String, String> {
    parse_env_file(path).into_iter().collect()
}

/// What `set -a; . FILE` exports in `shell` (as the OpenRC scripts load it).
fn sourced_by(shell: &[&str], path: &Path) -> BTreeMap<String, String> {
    let output = Command::new(shell[0])
        .args(&shell[1..])
        .args(["-c", "set -a; . \"$0\"; set +a; exec env"])
        .arg(path)
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .output()
        .unwrap();
    assert_ok(&output);
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Asserts that sh exports exactly what [`parse_env_file`] reads.
fn assert_sh_reads_it_the_same(path: &Path) {
    let expected = environment_of(path);
    for shell in [&["sh"][..], &["busybox", "sh"][..]] {
        let sourced = sourced_by(shell, path);
        let from_file: BTreeMap<_, _> =
            sourced.into_iter().filter(|(name, _)| expected.contains_key(name)).collect();
        assert_eq!(from_file, expected, "{shell:?} reads {} differently", path.display());
    }
}

/// Every `[env: NAME=...]` of `quilt worker --help`, with its `[default: ...]`.
fn worker_flag_environment() -> BTreeMap<String, Option<String>> {
    let output = Command::new(quilt_binary())
        .args(["worker", "--help"])
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .output()
        .unwrap();
    assert_ok(&output);
    // clap wraps long lines; one space between words undoes that.
    let help = String::from_utf8(output.stdout).unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
    let mut variables = BTreeMap::new();
    let mut rest = help.as_str();
    while let Some(start) = rest.find("[env: ") {
        let (name, after) = rest[start + "[env: ".len()..].split_once('=').expect("[env: NAME=value]");
        let after = &after[after.find(']').expect("[env: ...] closed") + 1..];
        let default =
            after.strip_prefix(" [default: ").map(|tail| tail[..tail.find(']').unwrap()].to_owned());
        variables.insert(name.to_owned(), default);
        rest = after;
    }
    assert!(variables.len() >= 20, "too few [env: ...] in `quilt worker --help`:\n{help}");
    variables
}

/// The default of `--shutdown-grace`, from `quilt worker --help`.
fn default_shutdown_grace() -> Duration {
    let variables = worker_flag_environment();
    let default = variables["QUILT_SHUTDOWN_GRACE"].clone().expect("--shutdown-grace has a default");
    parse_duration(&default).unwrap()
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify_with_the_real_binaries() {
    let analyze = which("systemd-analyze").expect("systemd-analyze is missing: apt-get install -y systemd");
    let dir = TestDir::new("deploy-verify");
    let worker = Unit::load("quilt-worker.service");
    let leaf = Unit::load("quilt-leaf.service");
    assert_eq!(worker.value("ExecStart"), "/usr/local/bin/quilt worker");
    assert_eq!(worker.value("EnvironmentFile"), "/etc/quilt/quilt.env");
    assert_eq!(leaf.value("ExecStart"), "/usr/local/bin/nats-server -c /etc/quilt/leaf.conf");
    assert_eq!(leaf.value("EnvironmentFile"), "/etc/quilt/leaf.env");

    // The installed paths, moved to this machine's binaries and copies of
    // the files: verify checks that ExecStart's program is executable.
    let nats_server = quilt::broker::find_nats_server(None).expect("a nats-server (QUILT_NATS_SERVER)");
    for file in ["deploy/quilt.env", "deploy/leaf.env", "broker-config/leaf.conf"] {
        let name = Path::new(file).file_name().unwrap();
        std::fs::copy(repository_file(file), dir.path.join(name)).unwrap();
    }
    let at = |name: &str| dir.path.join(name).display().to_string();
    let worker_text = worker.with_line(
        "ExecStart=/usr/local/bin/quilt worker",
        &format!("ExecStart={} worker", quilt_binary().display()),
    );
    let worker_text = Unit { name: worker.name, text: worker_text }
        .with_line("EnvironmentFile=/etc/quilt/quilt.env", &format!("EnvironmentFile={}", at("quilt.env")));
    let leaf_text = leaf.with_line(
        "ExecStart=/usr/local/bin/nats-server -c /etc/quilt/leaf.conf",
        &format!("ExecStart={} -c {}", nats_server.display(), at("leaf.conf")),
    );
    let leaf_text = Unit { name: leaf.name, text: leaf_text }
        .with_line("EnvironmentFile=/etc/quilt/leaf.env", &format!("EnvironmentFile={}", at("leaf.env")));
    std::fs::write(dir.path.join(worker.name), &worker_text).unwrap();
    std::fs::write(dir.path.join(leaf.name), &leaf_text).unwrap();

    let verify = |units: &[&str]| -> Output {
        Command::new(&analyze)
            // Fail for our units only; the host's own are not ours to judge.
            .args(["verify", "--recursive-errors=no"])
            .args(units.iter().map(|unit| dir.path.join(unit)))
            .output()
            .unwrap()
    };
    let output = verify(&[worker.name, leaf.name]);
    // Diagnostics about the host's own unit files (the targets ours are
    // ordered after) are not about ours; anything else is.
    let about_ours: Vec<&str> = std::str::from_utf8(&output.stderr)
        .unwrap()
        .lines()
        .filter(|line| {
            let hosts = HOST_UNIT_DIRECTORIES.iter().any(|directory| line.starts_with(directory));
            !hosts || line.contains("quilt")
        })
        .collect();
    assert!(
        output.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {}\n{about_ours:#?}",
        output.status
    );

    // The same verify does speak up about a mistake in a unit.
    let typo = worker_text.replace("KillMode=process", "KilMode=process");
    std::fs::write(dir.path.join("typo.service"), typo).unwrap();
    let output = verify(&["typo.service"]);
    assert!(text(&output.stderr).contains("Unknown key"), "{}", text(&output.stderr));
}

#[test]
fn the_worker_unit_signals_only_the_worker_and_outwaits_its_grace() {
    let grace = default_shutdown_grace();
    let worker = Unit::load("quilt-worker.service");
    assert_eq!(worker.value("Type"), "exec");
    assert_eq!(worker.value("KillMode"), "process", "a stop must not kill long-running containers' shims");
    assert_eq!(worker.value("KillSignal"), "SIGTERM");
    assert!(
        worker.stop_timeout() > grace,
        "TimeoutStopSec {:?} within the grace {grace:?}",
        worker.stop_timeout()
    );
    assert_eq!(worker.value("Restart"), "on-failure");
    assert_eq!(worker.value("LimitNOFILE"), "1048576");
    for dependency in ["network-online.target", "quilt-leaf.service"] {
        assert!(worker.words("Wants").contains(dependency), "Wants={dependency}");
        assert!(worker.words("After").contains(dependency), "After={dependency}");
    }
    // A worker connected straight to the cluster has no leaf node.
    for key in ["Requires", "Requisite", "BindsTo", "PartOf"] {
        assert!(worker.values(key).is_empty(), "{key}= on the worker");
    }
    // Containers need root with every capability, namespace and cgroup.
    for key in [
        "User",
        "DynamicUser",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictNamespaces",
        "ProtectControlGroups",
    ] {
        assert!(worker.values(key).is_empty(), "{key}= on the worker breaks containers");
    }

    let leaf = Unit::load("quilt-leaf.service");
    assert_eq!(leaf.value("Restart"), "always");
    assert_eq!(leaf.value("KillSignal"), "SIGTERM");
}

/// Runs an OpenRC script in `shell` as openrc-run would: its conf.d
/// variable `env_variable` = `env_file`, the script sourced, then `depend`
/// and `start_pre`, with OpenRC's helpers stubbed. Prints the variables
/// OpenRC reads (`var NAME=value`), the dependencies (`depend ...`), the
/// helper calls, and the environment start-stop-daemon would get.
const OPENRC_HARNESS: &str = r#"
RC_SVCNAME=${1##*/}
ebegin() { :; }
eend() { return "${1:-0}"; }
einfo() { echo "einfo $*" >&2; }
ewarn() { echo "ewarn $*" >&2; }
eerror() { echo "eerror $*" >&2; }
checkpath() { echo "checkpath $*"; }
need() { echo "depend need $*"; }
use() { echo "depend use $*"; }
after() { echo "depend after $*"; }
before() { echo "depend before $*"; }
provide() { echo "depend provide $*"; }
keyword() { echo "depend keyword $*"; }
eval "$2=\$3"
. "$1"
for name in command command_args command_background pidfile output_log error_log retry rc_cgroup_cleanup; do
  eval "value=\${$name-}"
  echo "var $name=$value"
done
depend
start_pre || { echo "start_pre failed"; exit 3; }
echo "limit $(ulimit -n)"
echo "environment:"
exec env
"#;

/// What [`OPENRC_HARNESS`] reported.
struct OpenRcRun {
    variables: BTreeMap<String, String>,
    lines: Vec<String>,
    environment: BTreeMap<String, String>,
    stderr: String,
}

fn run_openrc_script(shell: &[&str], script: &str, env_variable: &str, env_file: &Path) -> Output {
    Command::new(shell[0])
        .args(&shell[1..])
        .args(["-c", OPENRC_HARNESS, "openrc-run"])
        .arg(repository_file(&format!("deploy/openrc/{script}")))
        .arg(env_variable)
        .arg(env_file)
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .output()
        .unwrap()
}

fn openrc_start(shell: &[&str], script: &str, env_variable: &str, env_file: &Path) -> OpenRcRun {
    let output = run_openrc_script(shell, script, env_variable, env_file);
    assert!(output.status.success(), "{shell:?} {script}: {} {}", text(&output.stdout), text(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (before, environment) =
        stdout.split_once("environment:\n").expect("the harness got to the environment");
    let variables = before
        .lines()
        .filter_map(|line| line.strip_prefix("var "))
        .map(|line| line.split_once('=').unwrap())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let lines = before.lines().filter(|line| !line.starts_with("var ")).map(str::to_owned).collect();
    let environment = environment
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    OpenRcRun { variables, lines, environment, stderr: text(&output.stderr) }
}

/// The open files limit the worker's start_pre sets in this environment,
/// and the warning it gives: 1048576 (the unit's LimitNOFILE=) where a
/// shell may raise the hard limit that far, else this process's hard limit.
fn expected_open_files() -> (String, String) {
    let raise = Command::new("sh").args(["-c", "ulimit -n 1048576"]).output().unwrap();
    if raise.status.success() {
        return ("1048576".to_owned(), String::new());
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let hard = line.split_whitespace().nth(4).unwrap().to_owned();
    let warning = format!("ewarn open files limited to {hard}, not 1048576");
    (hard, warning)
}

/// `TERM/<seconds>/...`: the seconds.
fn term_timeout(retry: &str) -> Duration {
    let mut steps = retry.split('/');
    assert_eq!(steps.next(), Some("TERM"), "retry={retry}: not SIGTERM first");
    let seconds = steps.next().and_then(|step| step.parse::<u64>().ok());
    Duration::from_secs(seconds.unwrap_or_else(|| panic!("retry={retry}: no timeout after TERM")))
}

#[test]
fn the_openrc_scripts_start_what_the_units_start_with_the_env_files_exported() {
    let grace = default_shutdown_grace();
    let dir = TestDir::new("deploy-openrc");
    for script in ["quilt-worker", "quilt-leaf"] {
        let path = repository_file(&format!("deploy/openrc/{script}"));
        let first = read(&format!("deploy/openrc/{script}")).lines().next().unwrap_or_default().to_owned();
        assert_eq!(first, "#!/sbin/openrc-run", "{script}");
        for shell in [&["sh"][..], &["busybox", "sh"][..]] {
            let output = Command::new(shell[0]).args(&shell[1..]).arg("-n").arg(&path).output().unwrap();
            assert!(output.status.success(), "{shell:?} -n {script}: {}", text(&output.stderr));
        }
    }

    let cases = [
        ("quilt-worker", "quilt_env_file", "deploy/quilt.env", "quilt-worker.service"),
        ("quilt-leaf", "leaf_env_file", "deploy/leaf.env", "quilt-leaf.service"),
    ];
    for (script, env_variable, env_file, unit) in cases {
        let env_copy = dir.path.join(format!("{script}.env"));
        std::fs::copy(repository_file(env_file), &env_copy).unwrap();
        let runs = [&["sh"][..], &["busybox", "sh"][..]]
            .map(|shell| openrc_start(shell, script, env_variable, &env_copy));
        let run = &runs[0];
        assert_eq!(runs[1].variables, run.variables, "{script}: dash and busybox ash disagree");
        assert_eq!(runs[1].lines, run.lines, "{script}: dash and busybox ash disagree");
        assert_eq!(runs[1].stderr, run.stderr, "{script}: dash and busybox ash disagree");

        // The command line of the systemd unit.
        let command_line = format!("{} {}", run.variables["command"], run.variables["command_args"]);
        assert_eq!(
            command_line.split_whitespace().collect::<Vec<_>>(),
            Unit::load(unit).exec_start(),
            "{script}"
        );
        assert_eq!(run.variables["command_background"], "true", "{script}");
        assert_eq!(run.variables["pidfile"], format!("/run/{script}.pid"));
        for log in ["output_log", "error_log"] {
            assert!(run.variables[log].starts_with("/var/log/quilt/"), "{script}: {log}");
        }
        assert!(
            run.lines.contains(&"checkpath --directory --mode 0755 /var/log/quilt".to_owned()),
            "{script}: {:?}",
            run.lines
        );
        assert!(run.lines.contains(&"depend need net".to_owned()), "{script}: {:?}", run.lines);
        let stop = term_timeout(&run.variables["retry"]);
        if script == "quilt-worker" {
            assert_eq!(command_line, "/usr/local/bin/quilt worker");
            assert!(
                stop > grace,
                "retry={}: TERM timeout within the grace {grace:?}",
                run.variables["retry"]
            );
            assert_eq!(
                run.variables["rc_cgroup_cleanup"], "no",
                "a stop must not kill long-running containers"
            );
            assert!(run.lines.contains(&"depend use quilt-leaf".to_owned()), "{:?}", run.lines);
            assert!(run.lines.contains(&"depend after firewall".to_owned()), "{:?}", run.lines);
            let (limit, warning) = expected_open_files();
            assert!(run.lines.contains(&format!("limit {limit}")), "{:?}", run.lines);
            assert_eq!(run.stderr, warning);
        } else {
            assert_eq!(command_line, "/usr/local/bin/nats-server -c /etc/quilt/leaf.conf");
            assert_eq!(run.stderr, "", "{script} wrote to stderr");
        }

        // start_pre exported every setting of the env file: start-stop-daemon
        // passes its environment on to the service.
        for run in &runs {
            for (name, value) in environment_of(&env_copy) {
                assert_eq!(run.environment.get(&name), Some(&value), "{script}: {name} not exported");
            }
        }

        // Without the env file the service does not start on defaults.
        let output = run_openrc_script(&["sh"], script, env_variable, &dir.path.join("missing.env"));
        assert_eq!(output.status.code(), Some(3), "{script}: {}", text(&output.stdout));
        assert!(text(&output.stderr).starts_with("eerror "), "{script}: {}", text(&output.stderr));
    }
}

#[test]
fn quilt_env_documents_every_worker_variable_and_leaf_env_every_leaf_conf_one() {
    let variables = worker_flag_environment();
    let path = repository_file("deploy/quilt.env");
    // Settings and commented-out defaults alike: `#QUILT_NAME=value`.
    let mut documented = BTreeMap::new();
    for line in read("deploy/quilt.env").lines() {
        let (commented, setting) = match line.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((name, value)) = setting.split_once('=') else { continue };
        if !name.starts_with("QUILT_")
            || !name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        assert!(documented.insert(name.to_owned(), (commented, value.to_owned())).is_none(), "{name} twice");
    }
    for (name, (commented, value)) in &documented {
        // QUILT_LOG is read by the program, not a flag.
        assert!(
            variables.contains_key(name) || name == "QUILT_LOG",
            "{name} is no variable of `quilt worker`"
        );
        if let (true, Some(Some(default))) = (commented, variables.get(name)) {
            assert_eq!(value, default, "#{name}= shows {value}, but the default is {default}");
        }
    }
    for name in variables.keys() {
        assert!(documented.contains_key(name), "{name} of `quilt worker --help` is not in deploy/quilt.env");
    }
    assert_sh_reads_it_the_same(&path);

    // leaf.env sets what leaf.conf references, and nothing else.
    let referenced: BTreeSet<String> = read("broker-config/leaf.conf")
        .lines()
        .map(|line| line.split('#').next().unwrap())
        .flat_map(|line| line.split('$').skip(1))
        .map(|tail| {
            tail.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|name: &String| name.starts_with("QUILT_"))
        .collect();
    let leaf_env = repository_file("deploy/leaf.env");
    let set: BTreeSet<String> = environment_of(&leaf_env).into_keys().collect();
    assert_eq!(set, referenced, "deploy/leaf.env against broker-config/leaf.conf");
    assert_sh_reads_it_the_same(&leaf_env);
}

/// A process this test started: SIGKILLed by its pid and reaped if the test
/// ends early.
struct Started {
    child: Option<Child>,
    log: PathBuf,
}

impl Started {
    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM, then a wait of at most `bound` for the exit.
    fn terminate(&mut self, bound: Duration) -> ExitStatus {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + bound;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "still running {bound:?} after SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |meta| meta.len())
    }

    /// Waits (bounded) until the log, after byte `from`, contains `needle`.
    async fn wait_for_log(&mut self, from: u64, needle: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let log = self.log_text();
            let tail = log.get(from as usize..).unwrap_or_default().to_owned();
            if tail.contains(needle) {
                return tail;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("exited ({status}) before {needle:?}:\n{tail}");
            }
            assert!(Instant::now() < deadline, "no {needle:?} within {BOUND:?}:\n{tail}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Starts `argv` with exactly `environment` (and systemd's PATH), its
/// output appended to `log`; with `cgroup`, inside that cgroup from its
/// first instruction, as systemd starts a unit's main process in the unit's.
fn start_service(
    argv: &[String],
    environment: &BTreeMap<String, String>,
    cgroup: Option<&Path>,
    log: &Path,
) -> Started {
    let output = OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut command = match cgroup {
        Some(cgroup) => {
            let mut command = Command::new("/bin/sh");
            command.args(["-c", "echo $$ >\"$0/cgroup.procs\" && exec \"$@\""]).arg(cgroup).args(argv);
            command
        }
        None => {
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]);
            command
        }
    };
    command
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .envs(environment)
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output);
    Started { child: Some(command.spawn().unwrap()), log: log.to_path_buf() }
}

/// A free loopback port (free when this returns).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_node_runs_from_leaf_env_as_its_unit_starts_it_and_stops_on_sigterm() {
    let dir = TestDir::new("deploy-leaf");
    let unit = Unit::load("quilt-leaf.service");
    let mut argv = unit.exec_start();
    assert_eq!(argv, ["/usr/local/bin/nats-server", "-c", "/etc/quilt/leaf.conf"]);
    argv[0] = quilt::broker::find_nats_server(None).expect("a nats-server").display().to_string();
    argv[2] = repository_file("broker-config/leaf.conf").display().to_string();

    // leaf.env as shipped makes a valid configuration.
    let shipped = environment_of(&repository_file("deploy/leaf.env"));
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .arg("-t")
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .envs(&shipped)
        .output()
        .unwrap();
    let said = format!("{} {}", text(&output.stdout), text(&output.stderr));
    assert!(output.status.success() && said.contains("is valid"), "nats-server -t: {said}");

    // Run it with the client listener on a free port and the hub nodes on
    // loopback ports where nothing listens (no hub: this test runs the
    // leaf's own side; tests/integration/sim.rs runs it against a hub).
    let client = format!("127.0.0.1:{}", free_port());
    let env_file = dir.path.join("leaf.env");
    let mut content = read("deploy/leaf.env");
    content.push_str(&format!("QUILT_LEAF_CLIENT={client}\n"));
    for node in 1..=3 {
        content.push_str(&format!("QUILT_HUB_{node}=nats-leaf://leaf:unused@127.0.0.1:{}\n", free_port()));
    }
    std::fs::write(&env_file, content).unwrap();
    let environment = environment_of(&env_file);
    let mut leaf = start_service(&argv, &environment, None, &dir.path.join("leaf.log"));

    // The local worker's user, with the password of leaf.env.
    let password = environment["QUILT_WORKER_PASSWORD"].clone();
    let deadline = Instant::now() + BOUND;
    let worker = loop {
        let attempt = async_nats::ConnectOptions::with_user_and_password("worker".into(), password.clone())
            .connection_timeout(Duration::from_secs(1))
            .connect(client.as_str())
            .await;
        match attempt {
            Ok(connection) => break connection,
            Err(error) => assert!(Instant::now() < deadline, "{client}: {error}\n{}", leaf.log_text()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .max_reconnects(Some(1))
        .connect(client.as_str())
        .await;
    assert!(anonymous.is_err(), "the leaf let a client in without the worker's password");
    drop(worker);

    let status = leaf.terminate(unit.stop_timeout());
    assert!(status.success(), "nats-server on SIGTERM: {status}\n{}", leaf.log_text());
}

/// A cgroup standing in for the worker unit's: where systemd would track
/// the unit (the unified hierarchy, else its own v1 `name=systemd` one).
/// Drop SIGKILLs whatever this test left in it, by pid, and removes it.
struct UnitCgroup {
    path: PathBuf,
}

impl UnitCgroup {
    fn new() -> UnitCgroup {
        let base = Path::new("/sys/fs/cgroup");
        let hierarchy = [base.to_path_buf(), base.join("unified")]
            .into_iter()
            .find(|dir| dir.join("cgroup.controllers").exists())
            .unwrap_or_else(|| base.join("systemd"));
        let path = hierarchy.join(format!("quilt-test-unit-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        UnitCgroup { path }
    }

    fn pids(&self) -> Vec<i32> {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        procs.lines().filter_map(|line| line.trim().parse().ok()).collect()
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After "pid (comm) ": the state, then the parent pid.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(1).unwrap().parse().unwrap()
}

fn name_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim().to_owned()
}

async fn inspect(agent: &Agent, name: &str) -> Value {
    agent.request("quilt.api.any.containers.inspect", &Value::String(name.into())).await["ok"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_from_quilt_env_as_its_unit_starts_it_drains_and_leaves_its_shims() {
    let Setup { dir, broker, data } = Setup::new("deploy-worker").await;
    let unit = Unit::load("quilt-worker.service");
    let mut argv = unit.exec_start();
    assert_eq!(argv, ["/usr/local/bin/quilt", "worker"]);
    argv[0] = quilt_binary().display().to_string();

    // deploy/quilt.env, then what differs here, as deploy/sim does it.
    let env_file = dir.path.join("quilt.env");
    let mut content = read("deploy/quilt.env");
    content.push_str(&format!("QUILT_DATA_DIR={}\nQUILT_NATS_URL={}\n", data.display(), broker.url));
    std::fs::write(&env_file, content).unwrap();
    let environment = environment_of(&env_file);

    let cgroup = UnitCgroup::new();
    let log = dir.path.join("worker.log");
    let mut worker = start_service(&argv, &environment, Some(&cgroup.path), &log);
    worker.wait_for_log(0, "worker ready").await;
    assert!(cgroup.pids().contains(&worker.pid()), "the worker is not in its unit's cgroup");
    let worker_id = std::fs::read_to_string(data.join("worker-id")).unwrap().trim().to_owned();
    let _containers = LongRunningGuard { worker_id: worker_id.clone() };
    let agent = Agent::connect(&broker.url).await;

    let create = json!({
        "id": "svc-create",
        "image": "busybox",
        "command": ["sh", "-c", "echo hello; exec sleep 100000"],
        "container": {"mode": "long_running", "name": "svc", "restart": "no"},
    });
    agent.submit(&create).await;
    let result = agent.result("svc-create", BOUND).await;
    assert_eq!(result["status"], "succeeded", "{result:#}");
    let deadline = Instant::now() + BOUND;
    let init = loop {
        let summary = inspect(&agent, "svc").await;
        if summary["status"] == "running" {
            break summary["pid"].as_i64().unwrap() as i32;
        }
        assert!(Instant::now() < deadline, "svc not running within {BOUND:?}: {summary}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let shim = parent_of(init);
    assert_eq!(name_of(shim), "quilt-shim");

    // A task runs when the stop comes: the worker finishes it first.
    let mut output = agent.client.subscribe("quilt.output.drain.*").await.unwrap();
    agent.client.flush().await.unwrap();
    agent.submit(&task("drain", &["sh", "-c", "echo started; sleep 2; echo finished"])).await;
    tokio::time::timeout(BOUND, output.next()).await.expect("the task started within the bound");
    let status = worker.terminate(unit.stop_timeout());
    assert!(status.success(), "the worker on SIGTERM: {status}\n{}", worker.log_text());
    let result = agent.result("drain", BOUND).await;
    assert_eq!(result["status"], "succeeded", "{result:#}");
    assert_eq!(result["stdout"], "started\nfinished\n");
    assert_eq!(result["attempt"], 1, "handed back instead of drained");

    // The worker is gone; its long-running container's shim is still in the
    // unit's cgroup, so any KillMode but `process` would kill it at stop.
    assert!(cgroup.pids().contains(&shim), "shim {shim} not in {:?}", cgroup.pids());
    assert!(Path::new(&format!("/proc/{init}")).exists(), "the container died with its worker");

    // The next worker (a restart, an upgrade) takes it over.
    let from = worker.log_len();
    worker = start_service(&argv, &environment, Some(&cgroup.path), &log);
    let started = worker.wait_for_log(from, "worker ready").await;
    assert!(started.contains("adopted a running long-running container"), "{started}");
    assert_eq!(inspect(&agent, "svc").await["pid"], init, "adopted, not started again");
    let exec =
        json!({"id": "svc-exec", "command": ["sh", "-c", "echo inside"], "container": {"target": "svc"}});
    agent.submit(&exec).await;
    let result = agent.result("svc-exec", BOUND).await;
    assert_eq!(result["stdout"], "inside\n", "{result:#}");
    assert_eq!(result["worker_id"], worker_id.as_str(), "the worker id is kept across restarts");

    let removed =
        agent.request("quilt.api.any.containers.remove", &json!({"name": "svc", "grace_s": 1})).await;
    assert_eq!(removed["ok"], "svc", "{removed}");
    let status = worker.terminate(unit.stop_timeout());
    assert!(status.success(), "the worker on SIGTERM: {status}\n{}", worker.log_text());
    assert_worker_left_nothing(&worker_id, &data);
    let deadline = Instant::now() + BOUND;
    while !cgroup.pids().is_empty() {
        assert!(Instant::now() < deadline, "left in the unit's cgroup: {:?}", cgroup.pids());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.stop().await;
}
