//! The indexer: drains the internal index queue into `_bulk`.
//!
//! Consumers publish each committed batch's documents as one durable
//! message (confirmed before they ack), so indexing never holds up MySQL
//! writes and no index write is lost while Elasticsearch is down, slow or
//! rejecting, nor across a restart. This task takes every ready index
//! message (up to its prefetch), sends their documents as one `_bulk` and
//! acts on the classification of `retry`: transient failures are retried
//! with backoff (the failed items alone), refused items go to
//! `chat_writer.index.dlq` with the reason. Messages are acked only when
//! every document is settled. Before bulks (at most every second), before
//! each retry and when idle, the index is checked (`watch`); a lost index
//! is recreated and a backfill from MySQL is requested (`backfill`). On
//! shutdown a bulk in flight is abandoned unacked, never waited for.

use super::encoder::split_documents;
use super::retry::{BulkVerdict, ItemVerdict};
use super::watch::IndexWatch;
use super::{backfill, Client};
use crate::amqp::consumer::{BatchConsumer, Next};
use crate::amqp::republish::{
    delivery_count, failure_properties, park_properties, Outgoing, Republisher,
};
use crate::amqp::{dead_letter_queue, INDEX_QUEUE};
use crate::backoff::Backoff;
use crate::metrics::{self, Dependency};
use crate::pipeline::COMMITTED_US_HEADER;
use crate::shutdown::Shutdown;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use std::time::Duration;

/// Initial prefetch of the index queue. From then on the prefetch follows
/// the size of the index messages (see [`adjusted_prefetch`]), and a
/// `_bulk` takes every message received, up to the prefetch.
pub const PREFETCH: u16 = 48;
/// About this many bytes of index messages are held unacked: the prefetch
/// is this divided by the mean message size (within 4..=256). Under a
/// steady rate each message holds a small batch (a few documents) and
/// `_bulk` costs per request, so a fixed prefetch of 48 (24 per `_bulk`)
/// fell behind at 2,000 msgs/s and the lag grew; in a backlog each message
/// holds up to a full batch, and a fixed 128 held 28 MiB at peak. 1 MiB:
/// documents at a steady 2,000 msgs/s p50 0.21× and p99 0.37× of the fixed
/// 48, backlog peak RSS unchanged; 2 MiB gained a little more but raised
/// the peak 3.6 MiB (A/B in the README).
pub const BUFFER_BYTES: usize = 1 << 20;
/// Bounds of the adjusted prefetch.
pub const PREFETCH_MIN: u16 = 4;
/// Bounds of the adjusted prefetch. The upper one also bounds what a
/// sudden change from small to large index messages can bring in before
/// the prefetch follows: 256 × `encoder::MAX_MESSAGE_BYTES` (64 KiB).
pub const PREFETCH_MAX: u16 = 256;

/// The prefetch that holds about [`BUFFER_BYTES`] of index messages of
/// `mean_bytes` each, within [`PREFETCH_MIN`]..=[`PREFETCH_MAX`].
pub fn adjusted_prefetch(mean_bytes: f64) -> u16 {
    if mean_bytes.is_nan() || mean_bytes < 1.0 {
        return PREFETCH_MAX;
    }
    let n = (BUFFER_BYTES as f64 / mean_bytes).floor();
    n.clamp(f64::from(PREFETCH_MIN), f64::from(PREFETCH_MAX)) as u16
}

/// Largest `_bulk` request body, in bytes (halved after a 413).
pub const MAX_BULK_BYTES: usize = 8 << 20;
/// Identity check before a bulk, at most this often.
const CHECK_BEFORE_BULK: Duration = Duration::from_secs(1);
/// Identity check while idle.
const CHECK_IDLE: Duration = Duration::from_secs(3);

/// The outcome of [`bulk_until_settled`].
#[derive(Debug, Default)]
pub struct Settled {
    /// Documents refused for good: (position in the input, reason).
    pub rejected: Vec<(usize, String)>,
    /// The index was found missing or replaced on the way: backfill it.
    pub backfill: bool,
}

/// Sends `docs` (each the two NDJSON lines of one document) with `_bulk`,
/// in requests of at most [`MAX_BULK_BYTES`], until every one is indexed or
/// refused for good, retrying transient failures with backoff (the failed
/// items alone) and repairing a missing index through `watch`.
///
/// Returns `None` if shutdown came while waiting to retry (nothing settled).
pub async fn bulk_until_settled(
    client: &Client,
    watch: &mut IndexWatch,
    docs: &[&[u8]],
    body: &mut Vec<u8>,
    shutdown: &Shutdown,
) -> Option<Settled> {
    let mut settled = Settled::default();
    let mut pending: Vec<usize> = (0..docs.len()).collect();
    let mut limit = MAX_BULK_BYTES;
    let mut backoff = Backoff::default();
    while !pending.is_empty() {
        // The next request: a prefix of what is pending, within the limit.
        let (mut take, mut bytes) = (0, 0);
        for i in &pending {
            if take > 0 && bytes + docs[*i].len() > limit {
                break;
            }
            bytes += docs[*i].len();
            take += 1;
        }
        let sent: Vec<usize> = pending.drain(..take).collect();
        body.clear();
        for i in &sent {
            body.extend_from_slice(docs[*i]);
        }
        // A bulk in flight is abandoned on shutdown: nothing of it is acked.
        let (buf, verdict) = shutdown
            .race(client.bulk(std::mem::take(body), sent.len()))
            .await?;
        *body = buf;
        let mut again = Vec::new();
        let mut index_missing = false;
        let mut transient = None;
        note_refusal(&verdict);
        match verdict {
            BulkVerdict::AllDone => {}
            BulkVerdict::RetryAll(reason) | BulkVerdict::Refused(reason) => {
                transient = Some(reason);
                again = sent;
            }
            BulkVerdict::IndexMissing => {
                index_missing = true;
                again = sent;
            }
            BulkVerdict::TooLarge if sent.len() == 1 => {
                settled.rejected.push((
                    sent[0],
                    "413: document over the server's request size limit".into(),
                ));
            }
            BulkVerdict::TooLarge => {
                limit = (bytes / 2).max(1);
                log::warn!("elasticsearch: 413 for a {bytes}-byte bulk; sending at most {limit} bytes per request");
                again = sent;
            }
            BulkVerdict::RejectAll(reason) => {
                settled
                    .rejected
                    .extend(sent.into_iter().map(|i| (i, reason.clone())));
            }
            BulkVerdict::Items(verdicts) => {
                for (i, v) in sent.into_iter().zip(verdicts) {
                    match v {
                        ItemVerdict::Done => {}
                        ItemVerdict::Retry(reason) | ItemVerdict::Refused(reason) => {
                            transient.get_or_insert(reason);
                            again.push(i);
                        }
                        ItemVerdict::IndexMissing => {
                            index_missing = true;
                            again.push(i);
                        }
                        ItemVerdict::Reject(reason) => settled.rejected.push((i, reason)),
                    }
                }
            }
        }
        // What failed goes first next time.
        again.append(&mut pending);
        pending = again;
        if index_missing {
            match watch.check(client).await {
                Ok(backfill) => settled.backfill |= backfill,
                Err(e) => transient = Some(e),
            }
        }
        if let Some(reason) = transient {
            metrics::get().set_up(Dependency::elasticsearch, false);
            log::warn!(
                "elasticsearch: {} of {} documents not indexed yet, retry={}: {reason}",
                pending.len(),
                docs.len(),
                backoff.attempts() + 1
            );
            if !backoff.wait(shutdown).await {
                return None;
            }
            // The index may have gone while the cluster was away: a retried
            // bulk into a missing index would auto-create it unmapped.
            if let Some(Ok(backfill)) = shutdown.race(watch.check(client)).await {
                settled.backfill |= backfill;
            }
        }
    }
    Some(settled)
}

/// Records what a `_bulk` answer says about the writer's credentials, as
/// the probe does for its own requests: a 401 or 403 (on the request or on
/// an item) is kept for `/readyz` and logged once per change of reason
/// (not again when the probe has just logged the same reason); an answer
/// without one ends it. A transport failure says nothing either way.
fn note_refusal(verdict: &BulkVerdict) {
    let m = metrics::get();
    match verdict.refusal() {
        Some(reason) => {
            let probe_said = m
                .failure(Dependency::elasticsearch)
                .is_some_and(|f| f.text == reason);
            if m.set_bulk_refusal(Some(reason.to_string())) && !probe_said {
                log::error!(
                    "elasticsearch: {reason}; documents wait in the index queue until this is fixed"
                );
            }
        }
        None if matches!(verdict, BulkVerdict::RetryAll(_)) => {}
        None => {
            if m.set_bulk_refusal(None) {
                log::info!("elasticsearch: _bulk accepted again");
            }
        }
    }
}

/// How often the index queue's depth is read for the metrics while busy.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Counts a settled `_bulk` round in the metrics: documents, refusals, its
/// duration and the lag from the oldest message's commit
/// ([`COMMITTED_US_HEADER`]) to now.
fn record(batch: &[Delivery], docs: usize, rejected: usize, started: std::time::Instant) {
    let m = metrics::get();
    m.set_up(Dependency::elasticsearch, true);
    m.indexed.inc_by((docs - rejected) as u64);
    m.index_rejected.inc_by(rejected as u64);
    m.bulk.observe(started.elapsed().as_secs_f64());
    if let Some(us) = oldest_committed(batch) {
        let lag = (crate::time::now_micros() - us).max(0) as f64 / 1e6;
        m.index_lag.set(lag);
    }
}

/// The commit time (µs) of the oldest message of `batch` that carries
/// [`COMMITTED_US_HEADER`] (backfill messages do not).
fn oldest_committed(batch: &[Delivery]) -> Option<i64> {
    batch
        .iter()
        .filter_map(|d| {
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(COMMITTED_US_HEADER) {
                    Some(AMQPValue::LongLongInt(us)) => Some(*us),
                    _ => None,
                })
        })
        .min()
}

/// Checks the index identity; on a new index, asks for a backfill.
/// Errors are logged (Elasticsearch may be down; bulks retry on their own).
async fn check_index(
    client: &Client,
    watch: &mut IndexWatch,
    republisher: &Republisher,
    shutdown: &Shutdown,
) -> Result<(), String> {
    match shutdown.race(watch.check(client)).await {
        None => Ok(()),
        Some(Ok(true)) => {
            metrics::get().set_up(Dependency::elasticsearch, true);
            backfill::request(republisher).await
        }
        Some(Ok(false)) => {
            metrics::get().set_up(Dependency::elasticsearch, true);
            Ok(())
        }
        Some(Err(e)) => {
            metrics::get().set_up(Dependency::elasticsearch, false);
            log::warn!("elasticsearch: cannot check index {}: {e}", client.index());
            Ok(())
        }
    }
}

/// Runs until shutdown (`Ok`) or an AMQP failure (`Err`).
pub async fn run(
    client: Client,
    mut consumer: BatchConsumer,
    republisher: Republisher,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut watch = IndexWatch::new();
    check_index(&client, &mut watch, &republisher, &shutdown).await?;
    let mut body: Vec<u8> = Vec::new();
    let mut mean_bytes = 0.0_f64;
    let mut backlog_checked = std::time::Instant::now();
    loop {
        let batch = match consumer.next(&shutdown, Some(CHECK_IDLE)).await? {
            Next::Shutdown => {
                park_on_shutdown(&mut consumer, &republisher, Vec::new()).await;
                return Ok(());
            }
            Next::Idle => {
                check_index(&client, &mut watch, &republisher, &shutdown).await?;
                let m = metrics::get();
                if let Ok(n) = consumer.ready_count().await {
                    m.set_index_ready(n);
                }
                m.index_lag.set(0.0);
                continue;
            }
            Next::Batch(b) => b,
        };
        metrics::get().set_index_in_hand(batch.len(), oldest_committed(&batch));
        if watch.due(CHECK_BEFORE_BULK) {
            check_index(&client, &mut watch, &republisher, &shutdown).await?;
        }
        // Index messages a quorum queue returned before are parked, like
        // work-queue deliveries (`pipeline`): republished as fresh copies
        // (confirmed) and acked with the batch, not indexed here.
        let returned: Vec<Outgoing<'_>> = batch
            .iter()
            .filter(|d| delivery_count(&d.properties) >= 1)
            .map(|d| Outgoing {
                queue: INDEX_QUEUE.to_string(),
                data: &d.data,
                properties: park_properties(&d.properties, &[]),
            })
            .collect();
        if !returned.is_empty() {
            republisher.publish_all(&returned).await?;
            count_parked(returned.len());
            log::info!(
                "index queue: parked {} messages the broker had returned before (x-delivery-count >= 1) as fresh copies",
                returned.len()
            );
        }
        let mut docs: Vec<&[u8]> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            if delivery_count(&d.properties) >= 1 {
                continue;
            }
            for r in split_documents(&d.data) {
                docs.push(&d.data[r]);
                owner.push(i);
            }
        }
        let bulk_started = std::time::Instant::now();
        let Some(settled) =
            bulk_until_settled(&client, &mut watch, &docs, &mut body, &shutdown).await
        else {
            // Not indexed: the index messages are parked (or, failing
            // that, return with the channel) for the next start.
            park_on_shutdown(&mut consumer, &republisher, batch).await;
            return Ok(());
        };
        if settled.backfill {
            backfill::request(&republisher).await?;
        }
        if !settled.rejected.is_empty() {
            let now_secs = crate::time::now_micros() / 1_000_000;
            let out: Vec<Outgoing<'_>> = settled
                .rejected
                .iter()
                .map(|(i, reason)| {
                    log::error!("elasticsearch: document refused, dead-lettered: {reason}");
                    Outgoing {
                        queue: dead_letter_queue(INDEX_QUEUE),
                        data: docs[*i],
                        properties: failure_properties(
                            &batch[owner[*i]].properties,
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
        record(&batch, docs.len(), settled.rejected.len(), bulk_started);
        metrics::get().set_index_in_hand(0, None);
        if backlog_checked.elapsed() >= BACKLOG_EVERY {
            backlog_checked = std::time::Instant::now();
            if let Ok(n) = consumer.ready_count().await {
                metrics::get().set_index_ready(n);
            }
        }
        // Follow the message size: mean over recent batches (weight 0.3 to
        // this one); change the prefetch (three round trips: qos, cancel,
        // consume) only when it is off by over a third.
        let bytes: usize = batch.iter().map(|d| d.data.len()).sum();
        let this = bytes as f64 / batch.len() as f64;
        mean_bytes = if mean_bytes > 0.0 {
            0.7 * mean_bytes + 0.3 * this
        } else {
            this
        };
        let target = adjusted_prefetch(mean_bytes);
        let current = consumer.prefetch();
        if u32::from(target) * 3 > u32::from(current) * 4
            || u32::from(target) * 4 < u32::from(current) * 3
        {
            consumer.set_prefetch(target).await?;
            log::debug!(
                "index queue prefetch {current} -> {target} (mean message {mean_bytes:.0} bytes)"
            );
        }
        log::debug!(
            "indexed documents={} refused={} messages={} bulk_us={}",
            docs.len(),
            settled.rejected.len(),
            batch.len(),
            bulk_started.elapsed().as_micros()
        );
    }
}

/// Counts `n` parked index messages in `deliveries_parked_total`.
fn count_parked(n: usize) {
    metrics::get()
        .parked
        .get_or_create(&metrics::Metrics::queue(INDEX_QUEUE))
        .inc_by(n as u64);
}

/// On shutdown, parks the index messages the consumer holds (`held`, and
/// what was received but not taken): republished to the index queue
/// (confirmed) and acked, instead of returned by the channel's close, which
/// a quorum queue counts against its delivery limit. Those of `held` that
/// arrived returned were parked on arrival and are only acked. Bounded by 5 s; on
/// a failure they return with the channel (logged).
async fn park_on_shutdown(
    consumer: &mut BatchConsumer,
    republisher: &Republisher,
    held: Vec<Delivery>,
) {
    // Deliveries of `held` that arrived returned already have their copy.
    let copied: std::collections::HashSet<u64> = held
        .iter()
        .filter(|d| delivery_count(&d.properties) >= 1)
        .map(|d| d.delivery_tag)
        .collect();
    let park = async {
        let all = consumer.cancel_and_take_all(held).await?;
        let out: Vec<Outgoing<'_>> = all
            .iter()
            .filter(|d| !copied.contains(&d.delivery_tag))
            .map(|d| Outgoing {
                queue: INDEX_QUEUE.to_string(),
                data: &d.data,
                properties: park_properties(&d.properties, &[]),
            })
            .collect();
        if !out.is_empty() {
            republisher.publish_all(&out).await?;
        }
        if let Some(last) = all.last() {
            consumer.ack_through(last).await?;
        }
        consumer.forget_stamps();
        count_parked(out.len());
        Ok::<usize, String>(out.len())
    };
    let parked = smol::future::or(async { Some(park.await) }, async {
        async_io::Timer::after(Duration::from_secs(5)).await;
        None
    })
    .await;
    match parked {
        Some(Ok(0)) => {}
        Some(Ok(n)) => log::info!("index queue: shutdown: parked {n} index messages not yet indexed"),
        Some(Err(e)) => log::warn!(
            "index queue: shutdown: could not park the index messages held ({e}); they return with the channel"
        ),
        None => log::warn!(
            "index queue: shutdown: parking took over 5 s; the index messages held return with the channel"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_follows_the_message_size() {
        // A steady rate: batches of a few documents, ~1.5 KB per message.
        assert_eq!(adjusted_prefetch(1_500.0), PREFETCH_MAX);
        assert_eq!(adjusted_prefetch(8_000.0), 131);
        // A backlog: full batches of 128 documents, ~38 KB per message.
        assert_eq!(adjusted_prefetch(38_000.0), 27);
        // Messages at the 1 MiB cap: 1 fits the budget; the floor is 4.
        assert_eq!(adjusted_prefetch(1_048_576.0), PREFETCH_MIN);
        assert_eq!(adjusted_prefetch(65_536.0), 16);
        // No data yet (or nonsense): the widest window.
        assert_eq!(adjusted_prefetch(0.0), PREFETCH_MAX);
        assert_eq!(adjusted_prefetch(f64::NAN), PREFETCH_MAX);
    }
}
