//! Rebuilding the index from MySQL (docs/elasticsearch.md).
//!
//! Two ways in, one unit of work (`messages_after`: 1,000 rows in id order,
//! encoded as one bulk body):
//!
//! - **Backfill, in the service.** When the indexer finds the index missing,
//!   replaced or not yet marked backfilled (`watch`), it publishes a cursor
//!   `{"after_id":0,"done":0}` to the
//!   durable queue `chat_writer.backfill`. The backfill task consumes one
//!   cursor at a time: it reads the next rows, publishes their documents to
//!   `chat_writer.index` and the next cursor (both confirmed), then acks the
//!   cursor it holds. The broker thus keeps the progress: a restart or a
//!   SIGKILL resumes where it stopped, and with several writers only the
//!   one holding the cursor works. The requester claims the backfill in the
//!   index's `_meta` and the pass renews the claim every [`CLAIM_REFRESH`],
//!   so other replicas that see the unfinished index do not request passes
//!   of their own (`watch`). At the end it sets the index's
//!   `_meta.chat_writer.backfilled` marker. Documents carry `version = updated_at`,
//!   so a backfill racing live updates never overwrites a newer body.
//! - **`chat-writer reindex`**, for an index lost while no writer ran: the
//!   same pass, sent straight to `_bulk`, with a progress line per chunk.

use super::encoder::{encode_bodies, split_documents};
use super::indexer::bulk_until_settled;
use super::watch::IndexWatch;
use super::Client;
use crate::amqp::consumer::BatchConsumer;
use crate::amqp::republish::{persistent, Outgoing, Republisher};
use crate::amqp::INDEX_QUEUE;
use crate::backoff::Backoff;
use crate::mysql::Store;
use crate::shutdown::Shutdown;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The durable queue holding the backfill cursor.
pub const BACKFILL_QUEUE: &str = "chat_writer.backfill";
/// Rows per chunk.
pub const CHUNK: usize = 1000;
/// How often a running backfill renews its claim on the index
/// (`_meta.chat_writer.backfill_claimed_us`), well within
/// [`super::watch::CLAIM_TTL`], so other replicas do not start their own.
pub const CLAIM_REFRESH: Duration = Duration::from_secs(10);

/// Where a backfill stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The last `messages.id` already queued for indexing.
    pub after_id: i64,
    /// Documents queued so far.
    pub done: u64,
}

/// Publishes `bodies` to the index queue and then the cursor, all confirmed.
async fn publish_cursor(
    republisher: &Republisher,
    cursor: Cursor,
    bodies: &[Vec<u8>],
) -> Result<(), String> {
    let data = serde_json::to_vec(&cursor).map_err(|e| e.to_string())?;
    let mut out: Vec<Outgoing<'_>> = bodies
        .iter()
        .map(|docs| Outgoing {
            queue: INDEX_QUEUE.to_string(),
            data: docs,
            properties: persistent("application/x-ndjson"),
        })
        .collect();
    out.push(Outgoing {
        queue: BACKFILL_QUEUE.to_string(),
        data: &data,
        properties: persistent("application/json"),
    });
    republisher.publish_all(&out).await
}

/// Starts a backfill from the first message.
///
/// Errors: the publish failed (the caller reconnects; the next identity
/// check after reconnecting sees the index as new again only if it is).
pub async fn request(republisher: &Republisher) -> Result<(), String> {
    log::warn!("backfill: requested; queuing every message for indexing");
    publish_cursor(republisher, Cursor::default(), &[]).await
}

/// The backfill task: runs until shutdown (`Ok`) or an AMQP failure.
pub async fn run(
    store: Store,
    client: Client,
    mut consumer: BatchConsumer,
    republisher: Republisher,
    shutdown: Shutdown,
) -> Result<(), String> {
    // The writer that requested the backfill claimed it just before.
    let mut claimed = Instant::now();
    loop {
        let Some(batch) = consumer.next_batch(&shutdown).await? else {
            return Ok(());
        };
        for d in &batch {
            let Ok(cursor) = serde_json::from_slice::<Cursor>(&d.data) else {
                log::error!(
                    "backfill: unreadable cursor {:?}; dropped",
                    String::from_utf8_lossy(&d.data)
                );
                continue;
            };
            let mut backoff = Backoff::default();
            let rows = loop {
                let Some(read) = shutdown
                    .race(store.messages_after(cursor.after_id, CHUNK))
                    .await
                else {
                    return Ok(());
                };
                match read {
                    Ok(rows) => break rows,
                    Err(e) => {
                        log::warn!(
                            "backfill: mysql error_class=infrastructure retry={}: {e}",
                            backoff.attempts() + 1
                        );
                        if !backoff.wait(&shutdown).await {
                            return Ok(());
                        }
                    }
                }
            };
            let Some(last) = rows.last() else {
                // Every row is queued: mark the index, then drop the cursor.
                let mut backoff = Backoff::default();
                while let Err(e) = client.mark_backfilled().await {
                    log::warn!(
                        "backfill: cannot mark index {} yet, retry={}: {e}",
                        client.index(),
                        backoff.attempts() + 1
                    );
                    if !backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                }
                log::info!(
                    "backfill: done, {} documents queued for indexing",
                    cursor.done
                );
                continue;
            };
            let next = Cursor {
                after_id: last.id,
                done: cursor.done + rows.len() as u64,
            };
            // Renewed before the next cursor exists: once it is published
            // another writer may finish the pass and mark the index, and a
            // late renewal would unmark it.
            if claimed.elapsed() >= CLAIM_REFRESH {
                claimed = Instant::now();
                if let Err(e) = client.claim_backfill().await {
                    log::warn!("backfill: cannot renew the claim on the index: {e}");
                }
            }
            publish_cursor(&republisher, next, &encode_bodies(&rows)).await?;
            if next.done % (CHUNK as u64 * 20) == 0 {
                log::info!("backfill: {} documents queued for indexing", next.done);
            }
        }
        consumer
            .ack_through(batch.last().expect("a batch is never empty"))
            .await?;
    }
}

/// `chat-writer reindex`: creates the index if missing (with the mapping)
/// and writes every message row into it, printing a progress line per
/// chunk to stderr. Returns the number of documents indexed.
///
/// Errors: MySQL or Elasticsearch failing for good, an index with another
/// mapping, or documents refused by Elasticsearch.
pub async fn reindex(store: &Store, client: &Client) -> Result<u64, String> {
    let shutdown = Shutdown::new();
    let mut watch = IndexWatch::new();
    watch.check(client).await?;
    if !client.inspect().await?.ours {
        return Err(format!(
            "index {} has another mapping (token is not a keyword); delete it or choose another ELASTICSEARCH_INDEX",
            client.index()
        ));
    }
    let total = store
        .count_messages()
        .await
        .map_err(|e| format!("mysql: {e}"))?;
    let started = Instant::now();
    let (mut after, mut done, mut refused) = (0i64, 0u64, 0usize);
    let mut body = Vec::new();
    loop {
        let rows = store
            .messages_after(after, CHUNK)
            .await
            .map_err(|e| format!("mysql: {e}"))?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let bodies = encode_bodies(&rows);
        let docs: Vec<&[u8]> = bodies
            .iter()
            .flat_map(|b| split_documents(b).into_iter().map(move |r| &b[r]))
            .collect();
        let settled = bulk_until_settled(client, &mut watch, &docs, &mut body, &shutdown)
            .await
            .ok_or("interrupted")?;
        for (_, reason) in &settled.rejected {
            log::error!("reindex: document refused: {reason}");
        }
        refused += settled.rejected.len();
        done += (rows.len() - settled.rejected.len()) as u64;
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        eprintln!(
            "reindex: {done}/{total} documents ({pct:.1}%), {:.0} docs/s",
            done as f64 / started.elapsed().as_secs_f64().max(0.001)
        );
    }
    if refused > 0 {
        return Err(format!(
            "{refused} documents refused by Elasticsearch (see above)"
        ));
    }
    client.mark_backfilled().await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips() {
        let c = Cursor {
            after_id: 41,
            done: 7,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"after_id":41,"done":7}"#);
        assert_eq!(serde_json::from_str::<Cursor>(&s).unwrap(), c);
    }
}
