//! `quilt image pull` against a real registry: Debian's `docker-registry`
//! started per test on a free loopback port with its storage in the test's
//! directory, images pushed into it with skopeo from the fixture layouts.
//! A small HTTP relay written here sits in front of it when a test needs to
//! see, slow down, authenticate or corrupt what goes over the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quilt_tests::images::busybox_layer;
use quilt_tests::images::{
    layer_tar, sha256_digest, write_oci_layout, write_oci_layout_multiplatform, Entry, ImageConfig,
    LayerCompression,
};
use quilt_tests::{
    assert_nothing_left, assert_ok, quilt, quilt_binary, run_image, text, wait_bounded, TestDir,
    COMMAND_DEADLINE,
};

fn assert_fails_with(output: &Output, needle: &str) {
    assert_eq!(
        output.status.code(),
        Some(125),
        "stdout {} stderr {}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains(needle), "stderr {stderr:?} does not mention {needle:?}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A docker-registry child process with its storage under `dir`; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let binary = Path::new("/usr/bin/docker-registry");
        assert!(binary.is_file(), "docker-registry missing: apt-get install -y docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: quilt-tests\n",
                    dir.join("storage").display()
                ),
            )
            .unwrap();
            let log = dir.join("access.log");
            let child = Command::new(binary)
                .arg("serve")
                .arg(&config)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
                .spawn()
                .unwrap();
            let mut registry = Registry { child, port, log };
            if registry.wait_ready() {
                return registry;
            }
            // Most likely the port was taken in between; drop kills it, try another.
        }
        panic!("docker-registry did not start; see {}", dir.join("registry.err").display());
    }

    fn wait_ready(&mut self) -> bool {
        for _ in 0..100 {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if http_get(self.port, "/v2/").is_some_and(|head| head.starts_with("HTTP/1.1 200")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `127.0.0.1:<port>`.
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob GETs the registry served so far.
    fn blob_gets(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"GET /v2/") && line.contains("/blobs/"))
            .count()
    }

    /// Push the OCI layout `layout:tag` as `<repo>:<tag>`.
    fn push(&self, layout: &Path, tag: &str, repo: &str, all: bool) {
        self.push_with(layout, tag, repo, if all { &["--all"] } else { &[] });
    }

    /// [`Registry::push`] with more skopeo flags.
    fn push_with(&self, layout: &Path, tag: &str, repo: &str, flags: &[&str]) {
        let output = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(flags)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .output()
            .unwrap();
        assert!(output.status.success(), "skopeo copy: {}", text(&output.stderr));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare GET on loopback; the response head, or None.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// What the relay does besides relaying.
#[derive(Clone, Default)]
struct Behaviour {
    /// Send blob bodies in 16 KiB pieces this far apart.
    throttle: Option<Duration>,
    /// Flip one byte of the body of GETs whose path ends with this.
    corrupt_path_suffix: Option<String>,
    /// Demand `Authorization: Bearer <TOKEN>` on /v2/ and serve /token.
    token_auth: bool,
    /// Basic credentials /token demands (`user:pass`), when any.
    token_credentials: Option<String>,
    /// Read the request, then never answer (until the client leaves, at most 30 s).
    stall: bool,
    /// Drop `Range` headers, as a registry without range support would ignore them.
    ignore_range: bool,
}

const TOKEN: &str = "quilt-test-token";

/// One request the relay saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
}

/// An HTTP relay on loopback in front of a registry: one request per
/// connection, each in its own thread, sockets with timeouts. Stopped on drop.
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(upstream: u16, behaviour: Behaviour) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let (seen, behaviour) = (seen.clone(), behaviour.clone());
                    std::thread::spawn(move || {
                        let _ = relay_one(client, upstream, port, &behaviour, &seen);
                    });
                }
            })
        };
        Relay { port, stop, seen, acceptor: Some(acceptor) }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn respond(client: &mut TcpStream, status: &str, extra_headers: &str, body: &str) -> std::io::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

fn relay_one(
    mut client: TcpStream,
    upstream: u16,
    own_port: u16,
    behaviour: &Behaviour,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    client.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        headers.push(line.trim_end().to_owned());
        if headers.len() > 100 {
            return Ok(());
        }
    }
    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    let header = |name: &str| {
        headers.iter().find_map(|h| {
            let (key, value) = h.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    };
    seen.lock().unwrap().push(Seen { path: path.clone(), range: header("range") });
    if behaviour.stall {
        client.set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match client.read(&mut [0u8; 64]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        return Ok(());
    }

    if behaviour.token_auth {
        if path.starts_with("/token") {
            let wanted = behaviour.token_credentials.as_ref().map(|credentials| {
                use base64_engine::encode;
                format!("Basic {}", encode(credentials.as_bytes()))
            });
            if wanted.is_some() && header("authorization") != wanted {
                return respond(&mut client, "401 Unauthorized", "", r#"{"details":"bad credentials"}"#);
            }
            return respond(&mut client, "200 OK", "", &format!(r#"{{"token":"{TOKEN}"}}"#));
        }
        if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{own_port}/token\",service=\"test\",scope=\"repository:secret/app:pull\"\r\n"
            );
            return respond(
                &mut client,
                "401 Unauthorized",
                &challenge,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
        }
    }

    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = request_line.clone();
    for line in &headers {
        let lower = line.to_ascii_lowercase();
        let dropped = lower.starts_with("connection:")
            || lower.starts_with("authorization:")
            || (behaviour.ignore_range && lower.starts_with("range:"));
        if !dropped {
            head.push_str(line);
            head.push_str("\r\n");
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    server.write_all(head.as_bytes())?;

    let is_blob = path.contains("/blobs/");
    let corrupt =
        behaviour.corrupt_path_suffix.as_ref().is_some_and(|suffix| path.ends_with(suffix.as_str()));
    let mut buffer = vec![0u8; 16 * 1024];
    let mut head_done = false;
    let mut head_bytes = Vec::new();
    let mut flipped = false;
    loop {
        let read = server.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        let mut chunk = buffer[..read].to_vec();
        if !head_done {
            head_bytes.extend_from_slice(&chunk);
            if let Some(end) = head_bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                head_done = true;
                let body_start_in_chunk = chunk.len() - (head_bytes.len() - (end + 4));
                if corrupt && !flipped && body_start_in_chunk < chunk.len() {
                    chunk[body_start_in_chunk] ^= 0xff;
                    flipped = true;
                }
            }
        } else if corrupt && !flipped {
            chunk[0] ^= 0xff;
            flipped = true;
        }
        client.write_all(&chunk)?;
        if let (true, Some(pause)) = (is_blob && head_done, behaviour.throttle) {
            std::thread::sleep(pause);
        }
    }
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// Base64 for the relay's check of basic credentials.
mod base64_engine {
    pub(super) fn encode(bytes: &[u8]) -> String {
        const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn record_names(data: &TestDir) -> Vec<String> {
    let output = quilt(data, &["image", "ls", "--json"]);
    assert_ok(&output);
    let records: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    records.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
}

fn blob_stored(data: &TestDir, digest: &str) -> bool {
    data.path.join("images/blobs/sha256").join(digest.trim_start_matches("sha256:")).exists()
}

#[test]
fn pulled_image_runs_and_a_second_pull_downloads_nothing() {
    let data = TestDir::new("pull-basic");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let extra = layer_tar(&[Entry::dir("srv", 0o755), Entry::file("srv/greeting", 0o644, "pulled\n")]);
    let config = ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() };
    let manifest =
        write_oci_layout(&layout, "v1", &[busybox_layer(), (extra, LayerCompression::Zstd)], &config);
    registry.push(&layout, "v1", "team/app", false);

    let name = format!("{}/team/app:v1", registry.host());
    let output = quilt(&data, &["image", "pull", &name]);
    assert_ok(&output);
    assert_eq!(text(&output.stdout), format!("{name} {manifest}"));
    assert!(text(&output.stderr).is_empty(), "not a terminal, yet stderr: {}", text(&output.stderr));
    let first = registry.blob_gets();
    assert_eq!(first, 3, "config and two layers");

    assert_eq!(run_image(&data, "pull-basic", &name, &["/bin/cat", "/srv/greeting"]), "pulled");

    let output = quilt(&data, &["image", "pull", &name]);
    assert_ok(&output);
    assert_eq!(text(&output.stdout), format!("{name} {manifest}"));
    assert_eq!(registry.blob_gets(), first, "the second pull downloaded blobs");

    // By digest: the manifest is checked against it.
    let by_digest = format!("{}/team/app@{manifest}", registry.host());
    assert_ok(&quilt(&data, &["image", "pull", &by_digest]));
    let wrong = format!("{}/team/app@sha256:{}", registry.host(), "0".repeat(64));
    assert_fails_with(&quilt(&data, &["image", "pull", &wrong]), "manifest not found");
    let missing = format!("{}/team/nothing:v1", registry.host());
    assert_fails_with(&quilt(&data, &["image", "pull", &missing]), "manifest not found");
}

#[test]
fn bad_references_and_unknown_hosts_fail_at_once() {
    let data = TestDir::new("pull-bad");
    let long = "a".repeat(10 * 1024);
    for (name, needle) in [
        ("", "empty image reference"),
        ("../x", "invalid registry host"),
        ("Team/app", "invalid repository"),
        ("127.0.0.1:5000/Team/app", "invalid repository"),
        (long.as_str(), "bytes long"),
    ] {
        let output = quilt(&data, &["image", "pull", name]);
        assert_fails_with(&output, needle);
    }
    let started = Instant::now();
    let output = quilt(&data, &["image", "pull", "nonexistent.invalid/x:1"]);
    assert_fails_with(&output, "cannot reach registry nonexistent.invalid");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    // A loopback port nobody listens on: refused, not a hang.
    let output = quilt(&data, &["image", "pull", &format!("127.0.0.1:{}/x:1", free_port())]);
    assert_fails_with(&output, "cannot reach registry 127.0.0.1");
    assert!(record_names(&data).is_empty());
}

#[test]
fn a_registry_that_never_answers_times_out() {
    let data = TestDir::new("pull-stall");
    // Nothing behind it is ever reached: it reads each request and stays silent.
    let relay = Relay::start(free_port(), Behaviour { stall: true, ..Behaviour::default() });
    let started = Instant::now();
    let output = quilt(&data, &["image", "pull", &format!("{}/x:1", relay.host()), "--timeout", "2s"]);
    assert_fails_with(&output, "timed out after 2s");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let output = quilt(&data, &["image", "pull", "x", "--timeout", "0s"]);
    assert_fails_with(&output, "invalid --timeout");
}

#[test]
fn multi_platform_index_yields_the_host_manifest() {
    let data = TestDir::new("pull-multi");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let (_, amd64) =
        write_oci_layout_multiplatform(&layout, "multi", &[busybox_layer()], &ImageConfig::default());
    registry.push(&layout, "multi", "team/multi", true);
    let name = format!("{}/team/multi:multi", registry.host());
    let output = quilt(&data, &["image", "pull", &name]);
    assert_ok(&output);
    assert_eq!(text(&output.stdout), format!("{name} {amd64}"));
    let listing = run_image(&data, "pull-multi", &name, &["/bin/sh", "-c", "ls /etc"]);
    assert!(!listing.contains("platform"), "the arm64 layer was used: {listing}");
}

/// A layer as the fixtures gzip it (no timestamp, so the same bytes every time).
fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(tar).unwrap();
    encoder.finish().unwrap()
}

/// A layer of incompressible bytes, big enough to take seconds through a throttled relay.
fn random_layer(bytes: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut content = Vec::with_capacity(bytes);
    while content.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        content.extend_from_slice(&state.to_le_bytes());
    }
    layer_tar(&[Entry::dir("data", 0o755), Entry::file("data/random", 0o644, content)])
}

#[test]
fn a_killed_pull_resumes_with_a_range_request() {
    let data = TestDir::new("pull-resume");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let big = random_layer(4 * 1024 * 1024);
    // gzip, as skopeo would compress a plain tar on its way to a registry.
    let big_digest = sha256_digest(&gzip(&big));
    write_oci_layout(
        &layout,
        "big",
        &[busybox_layer(), (big.clone(), LayerCompression::Gzip)],
        &ImageConfig::default(),
    );
    registry.push(&layout, "big", "team/big", false);
    // 16 KiB every 5 ms: about 3 MB/s, so the big layer takes over a second.
    let relay = Relay::start(
        registry.port,
        Behaviour { throttle: Some(Duration::from_millis(5)), ..Behaviour::default() },
    );
    let name = format!("{}/team/big:big", relay.host());

    let partial = data.path.join("images/tmp").join(format!("partial-{}", big_digest.replace(':', "-")));
    let mut child = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args(["image", "pull", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if have > 512 * 1024 {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            let output = child.wait_with_output().unwrap();
            panic!("the pull ended before it was killed: {}", text(&output.stderr));
        }
        assert!(start.elapsed() < COMMAND_DEADLINE, "the big layer never started arriving");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::metadata(&partial).expect("partial download kept").len();
    assert!(kept > 0 && kept < gzip(&big).len() as u64, "partial holds {kept} bytes");
    assert!(!blob_stored(&data, &big_digest));

    relay.clear();
    let output = quilt(&data, &["image", "pull", &name]);
    assert_ok(&output);
    let big_requests: Vec<Seen> =
        relay.seen().into_iter().filter(|seen| seen.path.ends_with(&big_digest)).collect();
    assert_eq!(big_requests.len(), 1, "{big_requests:?}");
    let range = big_requests[0].range.clone().expect("the second pull sent a Range header");
    let offset: u64 = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset >= kept / 2 && offset <= kept, "resumed at {offset}, {kept} were kept");
    assert!(blob_stored(&data, &big_digest));
    assert!(!partial.exists());
    let size = run_image(&data, "pull-resume", &name, &["/bin/sh", "-c", "wc -c < /data/random"]);
    assert_eq!(size, (4 * 1024 * 1024).to_string());
}

#[test]
fn token_auth_is_followed_and_wrong_credentials_are_refused() {
    let data = TestDir::new("pull-token");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let manifest = write_oci_layout(&layout, "v1", &[busybox_layer()], &ImageConfig::default());
    registry.push(&layout, "v1", "secret/app", false);
    let relay = Relay::start(
        registry.port,
        Behaviour {
            token_auth: true,
            token_credentials: Some("agent:hunter2".into()),
            ..Behaviour::default()
        },
    );
    let name = format!("{}/secret/app:v1", relay.host());
    let credentials = |user_pass: &str| {
        let path = data.path.join(format!("config-{}.json", user_pass.replace(':', "-")));
        let auth = base64_engine::encode(user_pass.as_bytes());
        std::fs::write(&path, format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, relay.host()))
            .unwrap();
        path
    };

    let good = credentials("agent:hunter2");
    let output = quilt(&data, &["image", "pull", &name, "--credentials", good.to_str().unwrap()]);
    assert_ok(&output);
    assert_eq!(text(&output.stdout), format!("{name} {manifest}"));
    assert!(relay.seen().iter().any(|seen| seen.path.starts_with("/token?")), "no token was asked for");
    assert_eq!(run_image(&data, "pull-token", &name, &["/bin/echo", "in"]), "in");

    let bad = credentials("agent:wrong");
    let output = quilt(&data, &["image", "rm", &name]);
    assert_ok(&output);
    let output = quilt(&data, &["image", "pull", &name, "--credentials", bad.to_str().unwrap()]);
    assert_fails_with(&output, "authentication to registry");
    assert!(record_names(&data).is_empty());
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_not_stored() {
    let data = TestDir::new("pull-corrupt");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let layer = busybox_layer();
    let layer_digest = sha256_digest(&gzip(&layer.0));
    write_oci_layout(&layout, "v1", &[layer], &ImageConfig::default());
    assert!(layout.join("blobs/sha256").join(layer_digest.trim_start_matches("sha256:")).is_file());
    registry.push(&layout, "v1", "team/bad", false);
    let relay = Relay::start(
        registry.port,
        Behaviour { corrupt_path_suffix: Some(layer_digest.clone()), ..Behaviour::default() },
    );
    let name = format!("{}/team/bad:v1", relay.host());
    let output = quilt(&data, &["image", "pull", &name]);
    assert_fails_with(&output, "digest mismatch");
    assert!(!blob_stored(&data, &layer_digest));
    let tmp: Vec<_> = std::fs::read_dir(data.path.join("images/tmp")).unwrap().flatten().collect();
    assert!(tmp.is_empty(), "left in tmp/: {:?}", tmp.iter().map(|e| e.file_name()).collect::<Vec<_>>());
    assert!(record_names(&data).is_empty());
}

#[test]
fn a_bad_partial_file_is_redone_and_a_refused_range_starts_over() {
    let data = TestDir::new("pull-partial");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let layer = busybox_layer();
    let blob = gzip(&layer.0);
    let digest = sha256_digest(&blob);
    write_oci_layout(&layout, "v1", &[layer], &ImageConfig::default());
    registry.push(&layout, "v1", "team/partial", false);
    let tmp = data.path.join("images/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let partial = tmp.join(format!("partial-{}", digest.replace(':', "-")));
    let layer_requests = |relay: &Relay| -> Vec<Option<String>> {
        relay.seen().into_iter().filter(|seen| seen.path.ends_with(&digest)).map(|seen| seen.range).collect()
    };

    // A kept prefix that is wrong: the resumed blob does not match, so it is fetched again whole.
    let mut prefix = blob[..100_000].to_vec();
    prefix[10] ^= 0xff;
    std::fs::write(&partial, &prefix).unwrap();
    let relay = Relay::start(registry.port, Behaviour::default());
    let name = format!("{}/team/partial:v1", relay.host());
    assert_ok(&quilt(&data, &["image", "pull", &name]));
    assert_eq!(layer_requests(&relay), [Some("bytes=100000-".to_owned()), None]);
    assert!(blob_stored(&data, &digest));
    assert!(!partial.exists());
    drop(relay);

    // A registry that ignores Range answers with the whole blob: the prefix is dropped, not appended to.
    assert_ok(&quilt(&data, &["image", "rm", &name]));
    assert_ok(&quilt(&data, &["image", "prune"]));
    assert!(!blob_stored(&data, &digest));
    std::fs::write(&partial, &blob[..100_000]).unwrap();
    let relay = Relay::start(registry.port, Behaviour { ignore_range: true, ..Behaviour::default() });
    let name = format!("{}/team/partial:v1", relay.host());
    assert_ok(&quilt(&data, &["image", "pull", &name]));
    assert_eq!(layer_requests(&relay), [Some("bytes=100000-".to_owned())]);
    assert!(blob_stored(&data, &digest));
    assert_eq!(run_image(&data, "pull-partial", &name, &["/bin/echo", "whole"]), "whole");
}

#[test]
fn concurrent_pulls_of_one_image_download_each_blob_once() {
    let data = TestDir::new("pull-concurrent");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let big = random_layer(2 * 1024 * 1024);
    let big_digest = sha256_digest(&gzip(&big));
    write_oci_layout(
        &layout,
        "v1",
        &[busybox_layer(), (big, LayerCompression::Gzip)],
        &ImageConfig::default(),
    );
    registry.push(&layout, "v1", "team/shared", false);
    let relay = Relay::start(
        registry.port,
        Behaviour { throttle: Some(Duration::from_millis(5)), ..Behaviour::default() },
    );
    let name = format!("{}/team/shared:v1", relay.host());
    let spawn = || {
        Command::new(quilt_binary())
            .arg("--data-dir")
            .arg(&data.path)
            .args(["image", "pull", &name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    for child in [first, second] {
        assert_ok(&wait_bounded(child, COMMAND_DEADLINE, &["image", "pull", &name]));
    }
    let fetched = relay.seen().into_iter().filter(|seen| seen.path.ends_with(&big_digest)).count();
    assert_eq!(fetched, 1, "the big layer was downloaded {fetched} times");
    assert!(blob_stored(&data, &big_digest));
    assert_eq!(run_image(&data, "pull-concurrent", &name, &["/bin/echo", "ok"]), "ok");
}

#[test]
fn docker_schema_2_manifests_pull_too() {
    let data = TestDir::new("pull-docker");
    let registry = Registry::start(&data.path.join("registry"));
    let layout = data.path.join("layout");
    let config =
        ImageConfig { cmd: Some(vec!["/bin/echo".into(), "docker-format".into()]), ..ImageConfig::default() };
    write_oci_layout(&layout, "v1", &[busybox_layer()], &config);
    registry.push_with(&layout, "v1", "team/docker", &["--format", "v2s2"]);
    let manifest = http_get_body(
        registry.port,
        "/v2/team/docker/manifests/v1",
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    assert!(
        manifest.contains("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        "not a Docker manifest: {manifest}"
    );
    let name = format!("{}/team/docker:v1", registry.host());
    let output = quilt(&data, &["image", "pull", &name]);
    assert_ok(&output);
    let record = quilt(&data, &["image", "inspect", &name]);
    assert_ok(&record);
    assert!(text(&record.stdout).contains("application/vnd.docker.image.rootfs.diff.tar.gzip"));
    let output = quilt(&data, &["run", "--local", "--name", "pull-docker", "--image", &name]);
    assert_ok(&output);
    assert_nothing_left(&data, "quilt", "pull-docker");
    assert_eq!(text(&output.stdout), "docker-format");
}

/// GET with an Accept header; the body.
fn http_get_body(port: u16, path: &str, accept: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}
