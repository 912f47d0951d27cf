//! `quilt worker --nats` and the client verbs against a NATS deployment
//! that requires TLS: a real nats-server with a certificate from a CA the
//! test makes. With `--tls-ca` the worker and `quilt run` connect and a task
//! runs end to end; without it the client refuses the unknown certificate.
//! With broker-config/tls.conf (client certificates verified), a worker
//! restarted with its certificate connects and keeps its queue; one without
//! a certificate, or with one from another CA, is refused.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quilt::broker::find_nats_server;
use quilt_tests::pipeline::{import_busybox, Worker, BOUND};
use quilt_tests::{quilt_binary, text, wait_bounded, TestDir};

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install -y openssl)");
    assert!(output.status.success(), "openssl {args:?}: {}", text(&output.stderr));
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=quilt test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend(ec);
    openssl(dir, &ca);
    let mut request =
        vec!["req", "-new", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"];
    request.extend(ec);
    openssl(dir, &request);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
}

/// A client key and certificate `NAME.key`/`NAME.pem` signed by `CA.pem`
/// (with `CA.key`); a new self-signed CA first when `CA.pem` is missing.
fn make_client_certificate(dir: &Path, name: &str, ca: &str) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    if !dir.join(format!("{ca}.pem")).exists() {
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        let mut args =
            vec!["req", "-x509", "-days", "1", "-subj", "/CN=another CA", "-keyout", &key, "-out", &pem];
        args.extend(ec);
        openssl(dir, &args);
    }
    let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    let subject = format!("/CN={name}");
    let mut args = vec!["req", "-new", "-subj", &subject, "-keyout", &key, "-out", &csr];
    args.extend(ec);
    openssl(dir, &args);
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    // An X.509 v3 certificate (rustls refuses v1) for client authentication.
    let extensions = format!("{name}.ext");
    std::fs::write(dir.join(&extensions), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extensions,
            "-out",
            &pem,
        ],
    );
}

/// A nats-server child requiring TLS, killed by its own handle on drop.
struct TlsServer(std::process::Child);

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

#[test]
fn a_worker_and_a_client_use_a_tls_only_nats_deployment() {
    let dir = TestDir::new("pipeline-tls");
    make_certificates(&dir.path);
    let port = free_port();
    let store = dir.path.join("jetstream");
    let config = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ntls {{ cert_file: \"{}\", key_file: \"{}\", timeout: 2 }}\n",
        store.display(),
        dir.path.join("server.pem").display(),
        dir.path.join("server.key").display()
    );
    let _server = spawn_server(&dir.path, port, &config);
    let url = format!("tls://127.0.0.1:{port}");
    let ca = dir.path.join("ca.pem");
    let ca = ca.to_str().unwrap();

    let data = dir.path.join("worker");
    import_busybox(&data);
    let mut worker = Worker::start(&data, &url, "tls", &["--tls-ca", ca]);

    let client_dir = dir.path.join("client");
    let run = |extra: &[&str]| {
        let child = Command::new(quilt_binary())
            .arg("--data-dir")
            .arg(&client_dir)
            .args(["run", "--image", "busybox", "--nats", &url])
            .args(extra)
            .args(["--", "echo", "over tls"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_bounded(child, BOUND, &["run over tls"])
    };
    let output = run(&["--tls-ca", ca]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "over tls");

    // A client that does not trust the deployment's CA is refused.
    let output = run(&[]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output.stdout));
    assert!(text(&output.stderr).contains("connecting to NATS"), "{}", text(&output.stderr));

    assert!(worker.terminate().success(), "{}", worker.log_text());
}

/// nats-server on `port` with its store in `dir/jetstream`; with
/// broker-config/tls.conf included when `tls` is set.
fn start_server(dir: &Path, port: u16, tls: bool) -> TlsServer {
    let mut config = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\n",
        dir.join("jetstream").display()
    );
    if tls {
        // nats-server resolves `include` against the including file's directory.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/tls.conf"),
            dir.join("tls.conf"),
        )
        .unwrap();
        config.push_str("include \"tls.conf\"\n");
    }
    spawn_server(dir, port, &config)
}

/// nats-server with `config` as `dir/nats.conf` (appending to
/// `dir/nats.log`, with the server certificates of `dir` in the
/// environment tls.conf reads), once it listens on `port`.
fn spawn_server(dir: &Path, port: u16, config: &str) -> TlsServer {
    std::fs::write(dir.join("nats.conf"), config).unwrap();
    let log = OpenOptions::new().create(true).append(true).open(dir.join("nats.log")).unwrap();
    let server = TlsServer(
        Command::new(find_nats_server(None).expect("nats-server (2.10+, $QUILT_NATS_SERVER)"))
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .env("QUILT_TLS_CERT", dir.join("server.pem"))
            .env("QUILT_TLS_KEY", dir.join("server.key"))
            .env("QUILT_TLS_CA", dir.join("ca.pem"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + BOUND;
    while std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

#[test]
fn a_worker_restarted_with_tls_required_connects_only_with_valid_certificates() {
    let dir = TestDir::new("pipeline-mtls");
    make_certificates(&dir.path);
    make_client_certificate(&dir.path, "worker", "ca");
    make_client_certificate(&dir.path, "rogue", "rogue-ca");
    let path = |name: &str| dir.path.join(name).to_str().unwrap().to_owned();
    let port = free_port();
    let data = dir.path.join("worker");
    import_busybox(&data);
    let client_dir = dir.path.join("client");
    let run = |url: &str, tls: &[&str], message: &str| {
        let child = Command::new(quilt_binary())
            .arg("--data-dir")
            .arg(&client_dir)
            .args(["run", "--image", "busybox", "--nats", url])
            .args(tls)
            .args(["--", "echo", message])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_bounded(child, BOUND, &["quilt run"])
    };

    // First without TLS: a task runs.
    let server = start_server(&dir.path, port, false);
    let plain = format!("nats://127.0.0.1:{port}");
    let mut worker = Worker::start(&data, &plain, "mtls", &[]);
    let output = run(&plain, &[], "plain");
    assert_eq!(text(&output.stdout), "plain", "{}", text(&output.stderr));
    assert!(worker.terminate().success(), "{}", worker.log_text());
    drop(server);

    // The deployment now requires TLS with client certificates. The worker,
    // given its certificate through the environment (as deploy/quilt.env
    // does), connects again, with its streams and queue as they were.
    let _server = start_server(&dir.path, port, true);
    let url = format!("tls://127.0.0.1:{port}");
    let (ca, cert, key) = (path("ca.pem"), path("worker.pem"), path("worker.key"));
    let mut worker = Worker::start_with_env(
        &data,
        &url,
        "mtls",
        &[],
        &[("QUILT_TLS_CA", &ca), ("QUILT_TLS_CERT", &cert), ("QUILT_TLS_KEY", &key)],
    );
    let output = run(&url, &["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key], "mutual tls");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "mutual tls");

    // Clients without a certificate, or with one from another CA, are refused.
    for tls in [
        vec!["--tls-ca", &ca],
        vec!["--tls-ca", &ca, "--tls-cert", &path("rogue.pem"), "--tls-key", &path("rogue.key")],
    ] {
        let output = run(&url, &tls, "refused");
        assert_eq!(output.status.code(), Some(125), "{tls:?}: {}", text(&output.stdout));
        assert!(text(&output.stderr).contains("connecting to NATS"), "{}", text(&output.stderr));
    }
    // A worker without a valid certificate never gets in: the server
    // refuses each handshake (its log says why), the worker keeps retrying
    // and never becomes ready.
    let server_log = || std::fs::read_to_string(dir.path.join("nats.log")).unwrap();
    for (name, tls, reason) in [
        ("nocert", vec!["--tls-ca", &ca], "client didn't provide a certificate"),
        (
            "rogue",
            vec!["--tls-ca", &ca, "--tls-cert", &path("rogue.pem"), "--tls-key", &path("rogue.key")],
            "certificate signed by unknown authority (CN=rogue",
        ),
    ] {
        let refusals_before = server_log().matches(reason).count();
        let log_path = dir.path.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(quilt_binary())
            .arg("--data-dir")
            .arg(dir.path.join(name))
            .args(["worker", "--nats", &url, "--worker-id", name, "--no-pull"])
            .args(&tls)
            .env("QUILT_LOG", "quilt=info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        // Three refused attempts, then stop watching (bounded).
        let deadline = Instant::now() + BOUND;
        while server_log().matches(reason).count() < refusals_before + 3 {
            assert!(Instant::now() < deadline, "{name}: the server did not refuse it:\n{}", server_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let worker_log = std::fs::read_to_string(&log_path).unwrap();
        assert!(!worker_log.contains("worker ready"), "{name} got in:\n{worker_log}");
        assert!(worker_log.contains("NATS connection event"), "{name} logged no failure:\n{worker_log}");
    }
    assert!(worker.terminate().success(), "{}", worker.log_text());
}
