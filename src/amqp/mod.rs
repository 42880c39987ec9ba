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

/// Opens a connection named `chat-writer` (visible in the management UI).
///
/// Errors: lapin's (refused, auth, vhost missing); the caller backs off.
pub async fn connect(url: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name("chat-writer".into());
    Connection::connect(url, props).await
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
