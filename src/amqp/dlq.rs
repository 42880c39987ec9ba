//! `chat-writer dlq show|replay <queue> [N]`: inspecting and replaying
//! dead letters without a management plugin.
//!
//! `show` reads up to N messages of `<queue>.dlq` with `basic.get`, prints
//! their failure headers and body, and acks none: closing the channel puts
//! them back. `replay` moves up to N messages (default: as many as the
//! queue held when it started, so a message that fails again is not looped)
//! from `<queue>.dlq` back to `<queue>`: each is published (confirmed) with
//! the body and properties kept and the failure headers removed, so it gets
//! fresh delay tiers, and only then acked in the `.dlq`.

use super::republish::{Outgoing, Republisher};
use super::{connect, dead_letter_queue};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

/// Headers the writer sets on a failed message; replay removes them.
const FAILURE_HEADERS: [&str; 5] = [
    "x-retry-count",
    "x-original-queue",
    "x-error",
    "x-first-failure",
    "x-death",
];

async fn open(url: &str, queue: &str) -> Result<(Connection, Channel, u32), String> {
    let conn = connect(url).await.map_err(|e| format!("connect: {e}"))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let dlq = dead_letter_queue(queue);
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(|e| format!("{dlq}: {e}"))?;
    Ok((conn, ch, q.message_count()))
}

/// One message of `<queue>.dlq` (`basic.get`, manual ack), if any.
async fn next(
    ch: &Channel,
    queue: &str,
) -> Result<Option<lapin::message::BasicGetMessage>, String> {
    ch.basic_get(
        dead_letter_queue(queue).as_str().into(),
        BasicGetOptions { no_ack: false },
    )
    .await
    .map_err(|e| e.to_string())
}

fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// Prints up to `n` dead letters of `<queue>.dlq` to stdout, leaving them
/// in the queue. Returns how many were printed.
///
/// Errors: the broker is unreachable or `<queue>.dlq` does not exist.
pub async fn show(url: &str, queue: &str, n: usize) -> Result<usize, String> {
    let (conn, ch, depth) = open(url, queue).await?;
    println!("{}: {depth} messages", dead_letter_queue(queue));
    let mut shown = 0;
    while shown < n {
        let Some(got) = next(&ch, queue).await? else {
            break;
        };
        shown += 1;
        let d = got.delivery;
        println!("#{shown}");
        if let Some(h) = d.properties.headers() {
            for name in [
                "x-error",
                "x-retry-count",
                "x-first-failure",
                "x-original-queue",
            ] {
                if let Some(v) = h.inner().get(name) {
                    println!("  {name}: {}", header_text(v));
                }
            }
        }
        let body = String::from_utf8_lossy(&d.data);
        let cut: String = body.chars().take(500).collect();
        println!(
            "  body ({} bytes): {cut}{}",
            d.data.len(),
            if cut.len() < body.len() { "…" } else { "" }
        );
    }
    // Unacked gets return to the queue when the channel closes.
    let _ = ch.close(200, "shown".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(shown)
}

/// Moves up to `n` (default: the depth at start) messages from
/// `<queue>.dlq` back to `<queue>`. Returns how many were moved.
///
/// Errors: the broker is unreachable, `<queue>.dlq` does not exist, or a
/// publish was not confirmed (that message stays in the `.dlq`).
pub async fn replay(url: &str, queue: &str, n: Option<usize>) -> Result<usize, String> {
    let (conn, ch, depth) = open(url, queue).await?;
    let publisher = Republisher::open(&conn).await.map_err(|e| e.to_string())?;
    let limit = n.unwrap_or(depth as usize).min(depth as usize);
    let mut moved = 0;
    while moved < limit {
        let Some(got) = next(&ch, queue).await? else {
            break;
        };
        let d = got.delivery;
        publisher
            .publish_all(&[Outgoing {
                queue: queue.to_string(),
                data: &d.data,
                properties: without_failure(&d.properties),
            }])
            .await?;
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        moved += 1;
    }
    let _ = conn.close(200, "replayed".into()).await;
    Ok(moved)
}

fn without_failure(p: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if !FAILURE_HEADERS.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::republish::{failure_properties, headers_of, retry_count};

    #[test]
    fn replay_strips_only_the_failure_headers() {
        let orig = BasicProperties::default()
            .with_timestamp(5)
            .with_headers(headers_of(&[("trace", AMQPValue::LongString("t".into()))]));
        let failed = failure_properties(&orig, "create_chats", "chat not found", 5, 100);
        let clean = without_failure(&failed);
        assert_eq!(retry_count(&clean), 0);
        assert_eq!(*clean.timestamp(), Some(5));
        let h = clean.headers().as_ref().unwrap().inner();
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("trace"), Some(&AMQPValue::LongString("t".into())));
    }
}
