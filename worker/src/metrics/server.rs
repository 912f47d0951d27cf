//! The endpoint: HTTP/1.1 on a tokio `TcpListener`, one request per
//! connection. `GET /metrics` gets the exposition; another path gets 404,
//! another method on `/metrics` 405, a request line that is not HTTP/1.x
//! 400, a head over [`MAX_HEAD_BYTES`] 431, a head not complete within
//! [`CLIENT_TIMEOUT`] 408. Every answer closes the connection.
//!
//! What bounds a hostile client: the head it may send (8 KiB), the time it
//! may take to send it and to take the answer (5 s each), and the
//! connections served at once (the rest wait in the listen backlog). A
//! scrape also asks JetStream for the queue's depth, so an unbounded number
//! of parallel scrapes would be an unbounded number of requests to the
//! server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::{render, Source};

/// Most bytes of request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Longest a client may take to send its request head, and to take the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// After the answer, how much of what the client still sends is read, and
/// for how long, before closing: closing a socket with unread input sends a
/// reset, which can destroy the answer before the client read it (RFC 9112
/// section 9.6, "tear-down").
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Failures of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Binding the listening socket (address in use, not local, ...).
    #[error("binding the metrics endpoint to {address}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The bounds the server holds clients to.
#[derive(Debug, Clone, Copy)]
struct Limits {
    head_bytes: usize,
    client_timeout: Duration,
    connections: usize,
}

const LIMITS: Limits =
    Limits { head_bytes: MAX_HEAD_BYTES, client_timeout: CLIENT_TIMEOUT, connections: MAX_CONNECTIONS };

/// A bound socket, not yet answering: bind early to fail early, serve once
/// there is something to serve.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    address: SocketAddr,
}

impl MetricsListener {
    /// Binds `address` (port 0 picks a free one).
    pub async fn bind(address: SocketAddr) -> Result<MetricsListener, MetricsError> {
        let bind_error = |source| MetricsError::Bind { address, source };
        let listener = TcpListener::bind(address).await.map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsListener { listener, address })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Starts answering, until [`MetricsServer::stop`].
    pub fn serve<S: Source>(self, source: S) -> MetricsServer {
        self.serve_with(source, LIMITS)
    }

    fn serve_with<S: Source>(self, source: S, limits: Limits) -> MetricsServer {
        let (stop, stopped) = watch::channel(false);
        let address = self.address;
        let task = tokio::spawn(accept_loop(self.listener, Arc::new(source), limits, stopped));
        MetricsServer { address, stop, task }
    }
}

/// The running endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting, drops the connections in progress and closes the socket.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

async fn accept_loop<S: Source>(
    listener: TcpListener,
    source: Arc<S>,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    // Dropped on return, which aborts the connections still in progress.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: pause rather than spin.
                tracing::warn!(%error, "metrics endpoint: accepting a connection failed");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = Arc::clone(&source);
        connections.spawn(async move {
            serve_connection(stream, source.as_ref(), limits).await;
            drop(permit);
        });
    }
}

/// An answer: status line, content type, body.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn error(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{reason}\n").into(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let allow = if self.status == 405 { "Allow: GET\r\n" } else { "" };
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Why no complete request head was read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// More than the limit without the blank line that ends a head.
    TooLarge,
    /// The client closed (or reset) the connection first.
    Closed,
}

/// Reads up to the blank line that ends a request head (CRLF CRLF, or a
/// bare LF LF, which RFC 9112 lets a server accept).
async fn read_head<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut buffer = vec![0u8; max];
    let mut filled = 0;
    loop {
        if filled == max {
            return Err(HeadError::TooLarge);
        }
        let read = reader.read(&mut buffer[filled..]).await.map_err(|_| HeadError::Closed)?;
        if read == 0 {
            return Err(HeadError::Closed);
        }
        // The end may straddle two reads: look back three bytes.
        let from = filled.saturating_sub(3);
        filled += read;
        let window = &buffer[from..filled];
        let end = window
            .windows(4)
            .position(|four| four == b"\r\n\r\n")
            .map(|at| at + 4)
            .or_else(|| window.windows(2).position(|two| two == b"\n\n").map(|at| at + 2));
        if let Some(end) = end {
            buffer.truncate(from + end);
            return Ok(buffer);
        }
    }
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes by the request line; headers are not looked at.
fn route(head: &[u8]) -> Route {
    let line = head.split(|byte| *byte == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else { return Route::BadRequest };
    let mut parts = line.strip_suffix('\r').unwrap_or(line).split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") || method.is_empty() || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Answers one request on `connection` and closes it.
async fn serve_connection<C, S>(mut connection: C, source: &S, limits: Limits)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: Source,
{
    let head =
        tokio::time::timeout(limits.client_timeout, read_head(&mut connection, limits.head_bytes)).await;
    let response = match head {
        Err(_) => Response::error(408, "Request Timeout"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => Response::error(431, "Request Header Fields Too Large"),
        Ok(Ok(head)) => match route(&head) {
            Route::Metrics => {
                let gauges = source.gauges().await;
                Response {
                    status: 200,
                    reason: "OK",
                    content_type: CONTENT_TYPE,
                    body: render(source.metrics(), &gauges).into_bytes(),
                }
            }
            Route::NotFound => Response::error(404, "Not Found"),
            Route::MethodNotAllowed => Response::error(405, "Method Not Allowed"),
            Route::BadRequest => Response::error(400, "Bad Request"),
        },
    };
    let answered = tokio::time::timeout(limits.client_timeout, async {
        connection.write_all(&response.to_bytes()).await?;
        connection.shutdown().await
    })
    .await;
    if !matches!(answered, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match connection.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::net::TcpStream;

    use super::*;
    use crate::metrics::{Gauges, Metrics, QueueDepth};

    /// A worker stand-in: fixed gauges, and a count of how often they were read.
    struct Fixed {
        metrics: Metrics,
        reads: AtomicU64,
    }

    impl Source for Fixed {
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }

        async fn gauges(&self) -> Gauges {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Gauges {
                tasks_running: 1,
                containers_running: 0,
                queue: Some(QueueDepth { pending: 5, ack_pending: 1 }),
                event_log_bytes: Some(4096),
            }
        }
    }

    async fn server(limits: Limits) -> MetricsServer {
        let listener = MetricsListener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let metrics = Metrics::new();
        metrics.task_finished(crate::protocol::TaskStatus::Failed);
        listener.serve_with(Fixed { metrics, reads: AtomicU64::new(0) }, limits)
    }

    /// Sends `request` (in one write) and reads the whole answer.
    async fn exchange(server: &MetricsServer, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answered and closed in time")
            .expect("read the answer");
        String::from_utf8(answer).unwrap()
    }

    fn status_of(answer: &str) -> &str {
        answer.split("\r\n").next().unwrap()
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition_and_closes() {
        let server = server(LIMITS).await;
        let answer = exchange(&server, b"GET /metrics HTTP/1.1\r\nHost: worker\r\nAccept: */*\r\n\r\n").await;
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
        assert!(body.contains("\nquilt_tasks_total{status=\"failed\"} 1\n"), "{body}");
        assert!(body.contains("\nquilt_queue_pending 5\n"), "{body}");
        // A query string and HTTP/1.0 are fine.
        let answer = exchange(&server, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_and_never_the_metrics() {
        let server = server(LIMITS).await;
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (b"GET /../metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 405 Method Not Allowed"),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
            (b"get /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
            (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ] {
            let answer = exchange(&server, request).await;
            assert_eq!(status_of(&answer), status, "for {:?}", String::from_utf8_lossy(request));
            assert!(!answer.contains("quilt_"), "{answer}");
            if status.contains("405") {
                assert!(answer.contains("\r\nAllow: GET\r\n"), "{answer}");
            }
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_without_reading_it_all() {
        let server = server(LIMITS).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_HEAD_BYTES * 4, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let answer = exchange(&server, &request).await;
        assert_eq!(status_of(&answer), "HTTP/1.1 431 Request Header Fields Too Large");
        // A head that just fits is read.
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_HEAD_BYTES - 4, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request.len(), MAX_HEAD_BYTES);
        assert_eq!(status_of(&exchange(&server, &request).await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_head_split_across_writes_is_read_whole() {
        let server = server(LIMITS).await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        for piece in [&b"GET /met"[..], b"rics HTTP/1.1\r", b"\nHost: a\r\n\r", b"\n"] {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_clients_time_out_and_do_not_hold_the_endpoint() {
        let limits =
            Limits { head_bytes: MAX_HEAD_BYTES, client_timeout: Duration::from_millis(300), connections: 2 };
        let server = server(limits).await;
        // As many silent clients as there are slots, and one that stops mid-head.
        let mut silent = Vec::new();
        for _ in 0..limits.connections {
            silent.push(TcpStream::connect(server.local_addr()).await.unwrap());
        }
        let mut stalled = TcpStream::connect(server.local_addr()).await.unwrap();
        stalled.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        // A real scrape still gets through, once the slow ones timed out.
        let answer = exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK");
        for mut client in silent.into_iter().chain([stalled]) {
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(status_of(&answer), "HTTP/1.1 408 Request Timeout");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn a_client_that_leaves_early_does_not_disturb_the_next() {
        let server = server(LIMITS).await;
        for _ in 0..20 {
            let stream = TcpStream::connect(server.local_addr()).await.unwrap();
            drop(stream);
        }
        let answer = exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn after_stop_nothing_answers() {
        let server = server(LIMITS).await;
        let address = server.local_addr();
        server.stop().await;
        assert!(TcpStream::connect(address).await.is_err(), "the socket is closed");
    }

    #[test]
    fn routing_looks_at_the_request_line_only() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: \xff\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics/ HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"DELETE /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(route(b""), Route::BadRequest);
    }
}
