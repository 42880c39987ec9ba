//! The AMQP side: connection, queue names, topology, consumers, and the
//! republisher that moves deliveries to delay and dead-letter queues.
//!
//! lapin reads and writes the socket on its own `lapin-io-loop` thread;
//! every consumer loop of ours runs on the writer's single `LocalExecutor`.

pub mod consumer;
pub mod dlq;
pub mod republish;
pub mod topology;

use lapin::{Connection, ConnectionProperties};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

/// The three work queues the API publishes to (README, "How it works").
pub const WORK_QUEUES: [&str; 3] = ["create_chats", "create_messages", "update_messages"];

/// The writer's own durable queue of index operations: one message per
/// committed batch, an NDJSON `_bulk` body (see `elasticsearch::indexer`).
pub const INDEX_QUEUE: &str = "chat_writer.index";

/// `<queue>.dlq`, where dead letters go (README, "Failure semantics").
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// `<queue>.retry.<delay>`, e.g. `create_messages.retry.5s`.
pub fn retry_queue(queue: &str, delay: std::time::Duration) -> String {
    format!("{queue}.retry.{}", crate::config::format_duration(delay))
}

/// `frame_max` proposed to the broker unless RABBITMQ_URL sets one: lapin
/// keeps a send and a receive buffer of 32 frames each, so the broker's
/// default of 128 KiB would pin 8 MiB of memory per connection; 16 KiB
/// frames keep that at 1 MiB. Larger messages simply span several frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// How long opening a connection (TCP, the AMQP handshake, the vhost) may
/// take. lapin has no limit of its own: a peer that accepts the TCP
/// connection and never answers (a load balancer in front of a dead
/// broker, a partition during the handshake) would hang the writer for
/// good instead of letting it back off and try again.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a connection named `chat-writer` (visible in the management UI),
/// with `frame_max` [`DEFAULT_FRAME_MAX`] unless the URL sets it, within
/// [`CONNECT_TIMEOUT`].
///
/// lapin runs the handshake on its own I/O thread, which lives until its
/// socket fails. So the TCP connection is opened here (for `amqp://`),
/// with a copy of the socket kept aside: when the handshake times out, that
/// copy is shut down, and lapin's thread sees the socket fail and ends
/// (a dropped attempt would otherwise leave a thread and a socket behind
/// per timeout). For `amqps://` (default port 5671) the TLS handshake runs
/// on that socket too, with the trust and client certificate of `tls`
/// (RABBITMQ_TLS_*), the broker's certificate checked against the URL's
/// host (a name or an IP address).
///
/// Errors: lapin's (bad URL, refused, auth, vhost missing), a TLS failure
/// (its text names the reason, see [`crate::tls::refusal`]), or an I/O
/// `TimedOut` when the broker does not complete the handshake in time; the
/// caller backs off.
pub async fn connect(url: &str, tls: &crate::tls::Settings) -> lapin::Result<Connection> {
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::other(e)))?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let props = ConnectionProperties::default().with_connection_name("chat-writer".into());
    let secure = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    #[cfg(feature = "tls")]
    let tls_config = if secure {
        Some(
            crate::tls::client_config(tls)
                .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?,
        )
    } else {
        None
    };
    #[cfg(not(feature = "tls"))]
    if secure {
        let _ = tls;
        return Err(lapin::Error::from(std::io::Error::other(
            "amqps:// needs a build with the `tls` feature",
        )));
    }
    let socket: Arc<Mutex<Option<TcpStream>>> = Arc::default();
    let kept = socket.clone();
    let open = async move |uri: lapin::uri::AMQPUri, _runtime| {
        let host = uri.authority.host.clone();
        let port = uri.authority.port;
        let addrs = smol::unblock(move || {
            std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .map(|a| a.collect::<Vec<_>>())
        })
        .await
        .map_err(lapin::Error::from)?;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no address", uri.authority.host),
        );
        for addr in addrs {
            match async_io::Async::<TcpStream>::connect(addr).await {
                Ok(stream) => {
                    if let (Ok(copy), Ok(mut slot)) = (stream.get_ref().try_clone(), kept.lock()) {
                        *slot = Some(copy);
                    }
                    let plain = lapin::AsyncTcpStream::Plain(stream);
                    #[cfg(feature = "tls")]
                    if let Some(config) = &tls_config {
                        let connector = tcp_stream::RustlsConnector::from(config.clone());
                        return plain
                            .into_rustls(&connector, &uri.authority.host)
                            .await
                            .map_err(lapin::Error::from);
                    }
                    return Ok(plain);
                }
                Err(e) => last = e,
            }
        }
        Err(lapin::Error::from(last))
    };
    let runtime = lapin::runtime::default_runtime()?;
    let handshake = Connection::connector(uri, runtime, open, props);
    let timed_out = async {
        async_io::Timer::after(CONNECT_TIMEOUT).await;
        if let Some(s) = socket.lock().ok().and_then(|mut s| s.take()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no AMQP handshake within {} s", CONNECT_TIMEOUT.as_secs()),
        )))
    };
    let connected = smol::future::or(handshake, timed_out).await;
    // Connected (or failed on its own): the copy is not needed any more.
    drop(socket.lock().ok().and_then(|mut s| s.take()));
    connected
}

/// True when `e` is the broker's 404 NOT_FOUND (queue absent).
pub fn is_not_found(e: &lapin::Error) -> bool {
    soft_code(e) == Some(404)
}

/// True when `e` is the broker's 406 PRECONDITION_FAILED.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    soft_code(e) == Some(406)
}

fn soft_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}
