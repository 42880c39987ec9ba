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

/// The three work queues the API publishes to (CONTRACT section 3).
pub const WORK_QUEUES: [&str; 3] = ["create_chats", "create_messages", "update_messages"];

/// The writer's own durable queue of index operations: one message per
/// committed batch, an NDJSON `_bulk` body (see `elasticsearch::indexer`).
pub const INDEX_QUEUE: &str = "chat_writer.index";

/// `<queue>.dlq`, where dead letters go (CONTRACT section 3, Topology).
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

/// Opens a connection named `chat-writer` (visible in the management UI),
/// with `frame_max` [`DEFAULT_FRAME_MAX`] unless the URL sets it.
///
/// Errors: lapin's (bad URL, refused, auth, vhost missing); the caller
/// backs off.
pub async fn connect(url: &str) -> lapin::Result<Connection> {
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::other(e)))?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let props = ConnectionProperties::default().with_connection_name("chat-writer".into());
    Connection::connect_uri(uri, props).await
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
