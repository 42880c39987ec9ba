//! The HTTP endpoint for health checks and metrics (CONTRACT section 1,
//! issue 5).
//!
//! `GET /healthz` answers `200 ok` from a task on the writer's executor, so
//! an answer proves the process is alive and its executor is turning.
//! `GET /readyz` answers `200 ready` only while connected to RabbitMQ and
//! MySQL and consuming, else `503` with the reason in one line
//! ([`crate::metrics::readiness`]). `GET /metrics` is the OpenMetrics text
//! exposition of [`crate::metrics`].
//! `chat-writer healthcheck` asks it and exits 0 or 1, because a scratch
//! image has no curl. The server reads one request line per connection and
//! closes it; it is not a general HTTP server.

use async_io::{Async, Timer};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Content type of `/metrics`: the OpenMetrics text format, which
/// Prometheus scrapes natively.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Default of HTTP_ADDR.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9464";

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
/// slow client cannot hold up the next.
pub async fn serve(listener: Async<TcpListener>) {
    let conns = async_executor::LocalExecutor::new();
    conns
        .run(async {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => conns.spawn(answer(stream)).detach(),
                    Err(e) => {
                        log::warn!("http: accept failed: {e}");
                        Timer::after(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await
}

async fn answer(mut stream: Async<TcpStream>) {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    let read = async {
        while len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
                        || buf[..len].contains(&b'\n')
                    {
                        break;
                    }
                }
            }
        }
    };
    smol::future::or(read, async {
        Timer::after(Duration::from_secs(5)).await;
    })
    .await;
    let line = std::str::from_utf8(&buf[..len])
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
    let _ = stream.flush().await;
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
