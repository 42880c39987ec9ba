//! The HTTP endpoint for health checks and metrics (README, "Monitoring").
//!
//! `GET /healthz` answers `200 ok` from a task on the writer's executor, so
//! an answer proves the process is alive and its executor is turning.
//! `GET /readyz` answers `200 ready` only while connected to RabbitMQ and
//! MySQL and consuming, else `503` with the reason in one line
//! ([`crate::metrics::readiness`]). `GET /metrics` is the OpenMetrics text
//! exposition of [`crate::metrics`].
//! `chat-writer healthcheck` asks it and exits 0 or 1, because a scratch
//! image has no curl. The server reads one request head per connection
//! (at most [`MAX_HEAD`] bytes, within [`READ_TIMEOUT`]), answers it and
//! closes the connection; at most [`MAX_CONNECTIONS`] are open at once, so a
//! flood of clients cannot take the memory or file descriptors the writer
//! needs for its real work. It is not a general HTTP server.

use async_io::{Async, Timer};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Content type of `/metrics`: the OpenMetrics text format, which
/// Prometheus scrapes natively.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Default of HTTP_ADDR.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9464";

/// Connections served at once; more are closed as soon as accepted. Each
/// costs a socket and a few KiB while it lives (at most [`READ_TIMEOUT`]
/// plus the answer), so this bounds the endpoint at about 1 MiB and 256
/// file descriptors whatever the clients do.
pub const MAX_CONNECTIONS: usize = 256;

/// The largest request head read (request line and headers); a longer one
/// is answered `431`.
pub const MAX_HEAD: usize = 8 * 1024;

/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses HTTP_ADDR (`host:port`); `None` for the empty string (disabled).
///
/// Errors: the accepted form, for the configuration error.
pub fn parse_addr(raw: &str) -> Result<Option<SocketAddr>, &'static str> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(Some)
        .ok_or("host:port, e.g. 0.0.0.0:9464, or empty to disable")
}

/// Binds `addr`. Errors: the address is taken or not local.
pub fn bind(addr: SocketAddr) -> std::io::Result<Async<TcpListener>> {
    Async::<TcpListener>::bind(addr)
}

/// Serves connections until the task is dropped. Each connection is
/// answered by its own small task on an executor nested in this one, so a
/// slow client cannot hold up the next; past [`MAX_CONNECTIONS`] open ones,
/// a new connection is closed at once (a warning at most every 10 s says
/// how many were).
pub async fn serve(listener: Async<TcpListener>) {
    let conns = async_executor::LocalExecutor::new();
    let open = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let (mut shed, mut shed_logged) = (0u64, None::<std::time::Instant>);
    conns
        .run(async {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) if open.get() >= MAX_CONNECTIONS => {
                        drop(stream);
                        shed += 1;
                        if shed_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            log::warn!(
                                "http: {MAX_CONNECTIONS} connections open; closed {shed} more at once"
                            );
                            (shed, shed_logged) = (0, Some(std::time::Instant::now()));
                        }
                    }
                    Ok((stream, _)) => {
                        let open = open.clone();
                        open.set(open.get() + 1);
                        conns
                            .spawn(async move {
                                answer(stream).await;
                                open.set(open.get() - 1);
                            })
                            .detach();
                    }
                    Err(e) => {
                        log::warn!("http: accept failed: {e}");
                        Timer::after(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await
}

/// Reads a request head into `buf`: up to the blank line that ends it, or
/// the first line alone for a request without an HTTP version (`GET
/// /healthz`). Returns whether the head is complete (false: the client
/// closed, failed, or sent more than [`MAX_HEAD`] bytes without one).
async fn read_head(stream: &mut Async<TcpStream>, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_HEAD {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let first_line_end = buf.iter().position(|b| *b == b'\n');
        let versionless =
            first_line_end.is_some_and(|end| !buf[..end].windows(5).any(|w| w == b"HTTP/"));
        if versionless
            || buf.windows(4).any(|w| w == b"\r\n\r\n")
            || buf.windows(2).any(|w| w == b"\n\n")
        {
            return true;
        }
    }
    false
}

async fn answer(mut stream: Async<TcpStream>) {
    let mut buf = Vec::with_capacity(1024);
    let complete = smol::future::or(read_head(&mut stream, &mut buf), async {
        Timer::after(READ_TIMEOUT).await;
        false
    })
    .await;
    if !complete && buf.len() >= MAX_HEAD {
        let body = "request head too large\n";
        let head = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        close_gracefully(stream).await;
        return;
    }
    let line = std::str::from_utf8(&buf)
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // The path without a query string (`/metrics?x=y` is `/metrics`).
    let path = path.split('?').next().unwrap_or("");
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body): (&str, std::borrow::Cow<'static, str>) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "ok\n".into()),
        ("GET" | "HEAD", "/readyz") => match crate::metrics::readiness() {
            Ok(()) => ("200 OK", "ready\n".into()),
            Err(reason) => ("503 Service Unavailable", format!("{reason}\n").into()),
        },
        ("GET" | "HEAD", "/metrics") => {
            content_type = METRICS_CONTENT_TYPE;
            ("200 OK", crate::metrics::get().encode().into())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".into()),
        // No request line an HTTP client would send.
        _ if !path.starts_with('/') || !method.bytes().all(|b| b.is_ascii_uppercase()) => {
            ("400 Bad Request", "bad request\n".into())
        }
        _ => ("405 Method Not Allowed", "method not allowed\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    close_gracefully(stream).await;
}

/// Ends the answer without a reset: closing a socket that still holds
/// unread input (a request body, a pipelined request) makes the kernel
/// send RST, which can destroy the answer before the client has read it.
/// So: flush, send FIN, then read and drop what the client still sends
/// (at most 64 KiB, at most 1 s) before closing.
async fn close_gracefully(mut stream: Async<TcpStream>) {
    let _ = stream.flush().await;
    let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    smol::future::or(drain, async {
        Timer::after(Duration::from_secs(1)).await;
    })
    .await;
}

/// `chat-writer healthcheck`: `GET /healthz` at `addr` (an unspecified
/// address such as 0.0.0.0 is asked on loopback). `Ok` on 200; `Err` with
/// the URL and the status or the connection error otherwise.
pub fn healthcheck(addr: SocketAddr) -> Result<(), String> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .new_agent();
    let url = format!("http://{target}/healthz");
    match agent.get(&url).call() {
        Ok(r) if r.status().as_u16() == 200 => Ok(()),
        Ok(r) => Err(format!("{url}: HTTP {}", r.status().as_u16())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}
