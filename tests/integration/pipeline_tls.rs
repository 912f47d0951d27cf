//! `quilt worker --nats` and the client verbs against a NATS deployment
//! that requires TLS: a real nats-server with a certificate from a CA the
//! test makes. With `--tls-ca` the worker and `quilt run` connect and a task
//! runs end to end; without it the client refuses the unknown certificate.

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
    std::fs::write(dir.path.join("nats.conf"), config).unwrap();
    let program = find_nats_server(None).expect("nats-server (2.10+, $QUILT_NATS_SERVER)");
    let log = std::fs::File::create(dir.path.join("nats.log")).unwrap();
    let _server = TlsServer(
        Command::new(program)
            .arg("-c")
            .arg(dir.path.join("nats.conf"))
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
