//! The indexer: drains the internal index queue into `_bulk`.
//!
//! Consumers publish each committed batch's documents as one durable
//! message (confirmed before they ack), so indexing never holds up MySQL
//! writes and no index write is lost while Elasticsearch is down, slow or
//! rejecting, nor across a restart. This task takes every ready index
//! message (up to its prefetch), sends their documents as one `_bulk`,
//! and acts on the classification of `retry`: transient failures are
//! retried with backoff (failed items alone), a missing index is created
//! with the mapping, refused items go to `chat_writer.index.dlq` with the
//! reason. Messages are acked only when every document is settled.

use super::encoder::split_documents;
use super::retry::{BulkVerdict, ItemVerdict};
use super::Client;
use crate::amqp::consumer::BatchConsumer;
use crate::amqp::republish::{failure_properties, Outgoing, Republisher};
use crate::amqp::{dead_letter_queue, INDEX_QUEUE};
use crate::backoff::Backoff;
use crate::shutdown::Shutdown;
use std::ops::Range;

/// Index messages taken per `_bulk` (each holds up to one batch of documents).
pub const PREFETCH: u16 = 16;

/// A document inside a delivery: (delivery index, byte range).
type Doc = (usize, Range<usize>);

/// Runs until shutdown (`Ok`) or an AMQP failure (`Err`).
pub async fn run(
    client: Client,
    mut consumer: BatchConsumer,
    republisher: Republisher,
    shutdown: Shutdown,
) -> Result<(), String> {
    // Before any bulk: a bulk into a missing index would auto-create it
    // with a dynamic mapping (token as text), not the contract's.
    let mut backoff = Backoff::default();
    loop {
        match client.ensure_index().await {
            Ok(created) => {
                if created {
                    log::info!(
                        "elasticsearch: created index {} with the mapping",
                        client.index()
                    );
                }
                break;
            }
            Err(e) => {
                log::warn!(
                    "elasticsearch: cannot check index yet, retry={}: {e}",
                    backoff.attempts() + 1
                );
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    }
    let mut body: Vec<u8> = Vec::new();
    loop {
        let Some(batch) = consumer.next_batch(&shutdown).await? else {
            return Ok(());
        };
        let mut pending: Vec<Doc> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            pending.extend(split_documents(&d.data).into_iter().map(|r| (i, r)));
        }
        let total = pending.len();
        let mut rejected: Vec<(Doc, String)> = Vec::new();
        let mut backoff = Backoff::default();
        while !pending.is_empty() {
            body.clear();
            for (i, r) in &pending {
                body.extend_from_slice(&batch[*i].data[r.clone()]);
            }
            let (buf, verdict) = client.bulk(std::mem::take(&mut body), pending.len()).await;
            body = buf;
            let mut index_missing = false;
            let mut transient = None;
            match verdict {
                BulkVerdict::AllDone => pending.clear(),
                BulkVerdict::RetryAll(reason) => transient = Some(reason),
                BulkVerdict::IndexMissing => index_missing = true,
                BulkVerdict::RejectAll(reason) => {
                    rejected.extend(pending.drain(..).map(|d| (d, reason.clone())));
                }
                BulkVerdict::Items(verdicts) => {
                    let mut again = Vec::new();
                    for (doc, v) in pending.drain(..).zip(verdicts) {
                        match v {
                            ItemVerdict::Done => {}
                            ItemVerdict::Retry(reason) => {
                                transient.get_or_insert(reason);
                                again.push(doc);
                            }
                            ItemVerdict::IndexMissing => {
                                index_missing = true;
                                again.push(doc);
                            }
                            ItemVerdict::Reject(reason) => rejected.push((doc, reason)),
                        }
                    }
                    pending = again;
                }
            }
            if index_missing {
                match client.ensure_index().await {
                    Ok(true) => log::warn!(
                        "elasticsearch: index {} was missing; created it with the mapping",
                        client.index()
                    ),
                    Ok(false) => {}
                    Err(e) => transient = Some(e),
                }
            }
            if let Some(reason) = transient {
                if !pending.is_empty() {
                    log::warn!(
                        "elasticsearch: {} of {total} documents not indexed yet, retry={}: {reason}",
                        pending.len(),
                        backoff.attempts() + 1
                    );
                    if !backoff.wait(&shutdown).await {
                        // Unacked: the index messages stay queued for the next start.
                        return Ok(());
                    }
                }
            }
        }
        if !rejected.is_empty() {
            let now_secs = crate::time::now_micros() / 1_000_000;
            let out: Vec<Outgoing<'_>> = rejected
                .iter()
                .map(|((i, r), reason)| {
                    log::error!("elasticsearch: document refused, dead-lettered: {reason}");
                    Outgoing {
                        queue: dead_letter_queue(INDEX_QUEUE),
                        data: &batch[*i].data[r.clone()],
                        properties: failure_properties(
                            &batch[*i].properties,
                            INDEX_QUEUE,
                            reason,
                            0,
                            now_secs,
                        ),
                    }
                })
                .collect();
            republisher.publish_all(&out).await?;
        }
        consumer
            .ack_through(batch.last().expect("a batch is never empty"))
            .await?;
        log::debug!(
            "indexed documents={total} refused={} messages={}",
            rejected.len(),
            batch.len()
        );
    }
}
