//! Queue declarations (README, "How it works": the work queues, their dead-letter and delay queues).
//!
//! A queue that exists is used as it is, whatever its arguments (an older writer or the API may have made it):
//! the writer asks with a passive declare first and only declares a queue
//! that is absent, durable, with no arguments (work, dead-letter and index
//! queues) or with the delay arguments (retry tiers). A
//! PRECONDITION_FAILED from a race with another declarer is success. Each
//! failed declare closes its channel, so a fresh one is opened after it.

use super::{dead_letter_queue, is_not_found, is_precondition_failed, retry_queue};
use super::{INDEX_QUEUE, WORK_QUEUES};
use crate::elasticsearch::backfill::BACKFILL_QUEUE;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use std::time::Duration;

/// Declares every queue the writer uses: the work queues, their `.dlq`, one
/// delay queue per work queue and tier, and (when indexing) the index queue,
/// its `.dlq` and the backfill cursor queue.
///
/// Errors: connection-level failures; the caller reconnects.
pub async fn declare_all(
    conn: &Connection,
    retry_delays: &[Duration],
    indexing: bool,
) -> lapin::Result<()> {
    let mut ch = conn.create_channel().await?;
    for q in WORK_QUEUES {
        ch = ensure(conn, ch, q, FieldTable::default()).await?;
        ch = ensure(conn, ch, &dead_letter_queue(q), FieldTable::default()).await?;
        for d in retry_delays {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(d.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(q)),
            );
            ch = ensure(conn, ch, &retry_queue(q, *d), args).await?;
        }
    }
    if indexing {
        ch = ensure(conn, ch, INDEX_QUEUE, FieldTable::default()).await?;
        ch = ensure(
            conn,
            ch,
            &dead_letter_queue(INDEX_QUEUE),
            FieldTable::default(),
        )
        .await?;
        ch = ensure(conn, ch, BACKFILL_QUEUE, FieldTable::default()).await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Makes sure the queue `name` exists (durable, no arguments if it has to
/// be created), on a channel of its own: for tools such as perf/.
///
/// Errors: connection-level failures.
pub async fn ensure_queue(conn: &Connection, name: &str) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    let ch = ensure(conn, ch, name, FieldTable::default()).await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Makes sure `name` exists; returns a usable channel for the next call.
async fn ensure(
    conn: &Connection,
    ch: Channel,
    name: &str,
    args: FieldTable,
) -> lapin::Result<Channel> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => return Ok(ch),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match ch.queue_declare(name.into(), durable, args).await {
        Ok(_) => {
            log::info!("declared queue={name}");
            Ok(ch)
        }
        Err(e) if is_precondition_failed(&e) => {
            log::info!("queue={name} exists with other arguments; using it as it is");
            conn.create_channel().await
        }
        Err(e) => Err(e),
    }
}
