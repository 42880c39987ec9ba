//! The batch pipeline of the three work queues: decode, write, republish,
//! mark, ack.
//!
//! For one batch of deliveries from one queue:
//! 1. decode every payload (malformed ones are set aside with the reason),
//!    give each edit its version (`edit_order`), and set aside the
//!    deliveries the broker had returned before (`x-delivery-count` >= 1)
//!    to be parked;
//! 2. write the valid ones to MySQL in one transaction, retrying in place
//!    with backoff on infrastructure faults (never acking, never
//!    dead-lettering for them);
//! 3. publish, with confirms: malformed and refused messages to
//!    `<queue>.dlq`; messages whose parent or row is missing to the next
//!    delay tier `<queue>.retry.<delay>` (or the `.dlq` after the last);
//!    parked deliveries to their own queue as fresh copies; the batch's
//!    documents as one message to the index queue (several if over 4 MiB);
//! 4. hand the change markers to the Redis flusher;
//! 5. ack the batch with one `multiple` ack.
//!
//! Steps 3–5 of one batch overlap steps 1–2 of the next (see [`run`]). If
//! shutdown comes while step 2 is still retrying, the batch is parked, with
//! whatever was received but not taken (`park_on_shutdown`); if that
//! fails it returns to the queue when the channel closes.
//!
//! Parking. A quorum queue counts how often it returned a message to the
//! queue (a channel or connection closed with it unacked, a consumer
//! cancelled) and drops it, or dead-letters it only where a dead-letter
//! exchange is set, once the count passes the queue's delivery limit
//! (RabbitMQ 4 sets 20 on every quorum queue). The writer cannot see the
//! limit (a policy may set it), so it never lets a count grow: it never
//! returns a delivery itself (a consumer that gives its deliveries back
//! republishes them), and a delivery that arrives with an
//! `x-delivery-count` of 1 or more is not processed but *parked*:
//! republished to its own queue, confirmed, without the broker's count
//! headers (a fresh message, count 0), before the rest of its batch is
//! written, and acked with the batch. Every copy of an edit carries its version, so parking
//! never changes which edit wins.

use crate::amqp::consumer::BatchConsumer;
use crate::amqp::republish::{
    delivery_count, failure_properties, headers_of, park_properties, persistent, retry_count,
    with_header, Outgoing, Republisher,
};
use crate::amqp::{dead_letter_queue, retry_queue, INDEX_QUEUE};
use crate::backoff::Backoff;
use crate::edit_order::{edit_version, EDIT_VERSION_HEADER, STAMPS};
use crate::elasticsearch::encoder::encode_bodies;
use crate::metrics::{self, Dependency, Metrics};
use crate::mysql::{classify, MessageRow, Outcome, Store};
use crate::payload::{CreateChat, CreateMessage, Malformed, UpdateMessage};
use crate::redis_store::{MarkerSender, Markers};
use crate::shutdown::Shutdown;
use crate::time::{created_at, now_micros, Micros};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// Header of an index message: when its batch was committed to MySQL,
/// microseconds since the epoch (integer), for `chat_writer_index_lag_seconds`.
pub const COMMITTED_US_HEADER: &str = "x-committed-us";

/// What every consumer shares.
pub struct Context {
    /// MySQL.
    pub store: Store,
    /// Confirm-mode publishing channel of the current connection.
    pub republisher: Republisher,
    /// Change markers to Redis.
    pub markers: MarkerSender,
    /// Whether documents are indexed (ELASTICSEARCH_URL set).
    pub indexing: bool,
    /// Delay tiers (RETRY_DELAYS).
    pub retry_delays: Vec<Duration>,
    /// How long a batch may fail to reach MySQL before its deliveries go
    /// back to the queue and the consumer pauses (MYSQL_REQUEUE_AFTER).
    pub mysql_requeue_after: Duration,
    /// The process-wide shutdown signal.
    pub shutdown: Shutdown,
}

/// Consumes `consumer`'s queue batch by batch until shutdown (`Ok`) or an
/// AMQP failure (`Err`, one line).
///
/// Two batches overlap: while batch N is being settled (its republished
/// messages confirmed, then acked), batch N+1 is taken and written to
/// MySQL. Writes stay in delivery order (one batch writes at a time) and
/// acks stay in order (N+1 is settled only after N).
pub async fn run(ctx: &Context, mut consumer: BatchConsumer) -> Result<(), String> {
    let queue = consumer.queue().to_string();
    let queue = queue.as_str();
    // Declared before the futures that borrow it, so it is dropped after them.
    let in_hand = InHand::new(queue);
    let in_hand = &in_hand;
    let mut settling: Option<Settling<'_>> = None;
    loop {
        let next = async {
            let taken: Result<_, String> = consumer.next_batch(&ctx.shutdown).await;
            let Some(batch) = taken? else {
                return Ok(Step::Stop(Vec::new(), Vec::new()));
            };
            let m = metrics::get();
            let label = Metrics::queue(queue);
            m.received.get_or_create(&label).inc_by(batch.len() as u64);
            in_hand.taken(batch.len());
            m.batch_size
                .get_or_create(&label)
                .observe(batch.len() as f64);
            let versions = edit_versions(queue, &batch, &consumer);
            // Deliveries the broker returned before are parked at once, so
            // they are safe however long the rest of the batch waits.
            let parked = park_returned(ctx, queue, &batch, &versions).await?;
            in_hand.settled(parked);
            match write_batch(ctx, queue, &batch, &versions, &mut consumer).await {
                Ok(written) => Ok::<_, String>(Step::Written(batch, written)),
                Err(Unwritten::Shutdown) => {
                    log::info!(
                        "queue={queue}: shutdown during a retry; {} deliveries not written",
                        batch.len()
                    );
                    Ok(Step::Stop(batch, versions))
                }
                Err(Unwritten::Requeue) => Ok(Step::GiveBack(batch, versions)),
            }
        };
        let (next, settled) = match settling.take() {
            Some(previous) => smol::future::zip(next, previous).await,
            None => (next.await, Ok(())),
        };
        settled?;
        let (batch, written) = match next? {
            Step::Written(batch, written) => (batch, written),
            Step::Stop(batch, versions) => {
                park_on_shutdown(ctx, &mut consumer, batch, &versions, in_hand).await;
                return Ok(());
            }
            Step::GiveBack(batch, versions) => {
                // The previous batch is settled: every unacked delivery on
                // this channel is this batch's or not yet taken.
                let paused = give_back(ctx, &mut consumer, batch, &versions, in_hand).await?;
                if resume_when_mysql_answers(ctx, &mut consumer, paused).await? {
                    continue;
                }
                return Ok(());
            }
        };
        let current = settle(ctx, queue, batch, written, in_hand);
        if ctx.shutdown.is_triggered() {
            current.await?;
            park_on_shutdown(ctx, &mut consumer, Vec::new(), &[], in_hand).await;
            return Ok(());
        }
        settling = Some(Box::pin(current));
    }
}

/// What taking and writing one batch came to.
enum Step {
    /// Written to MySQL; to be settled.
    Written(Vec<Delivery>, Written),
    /// Shutdown: stop taking batches; park what is held (a batch not
    /// written, with its edit versions, and what was received but not
    /// taken).
    Stop(Vec<Delivery>, Vec<Result<Micros, Malformed>>),
    /// MySQL kept failing: give the batch back ([`give_back`]), with the
    /// versions of its edits.
    GiveBack(Vec<Delivery>, Vec<Result<Micros, Malformed>>),
}

/// The version of every edit of `batch` (`edit_order`): empty for the
/// create queues. A delivery the consumer pulled before it was taken keeps
/// the stamp of its arrival; the others are stamped now, in delivery order.
fn edit_versions(
    queue: &str,
    batch: &[Delivery],
    consumer: &BatchConsumer,
) -> Vec<Result<Micros, Malformed>> {
    if queue != UPDATE_QUEUE {
        return Vec::new();
    }
    let now = now_micros();
    batch
        .iter()
        .map(|d| {
            let stamp = consumer
                .received_stamp(d.delivery_tag)
                .unwrap_or_else(|| STAMPS.next(now));
            edit_version(&d.properties, stamp)
        })
        .collect()
}

/// Publishes a parked copy of every delivery of `batch` that the broker
/// returned before (confirmed), before the batch is written: once its copy
/// is confirmed, what happens to the original (acked with the batch, or
/// returned again with a channel) no longer matters. Returns how many.
///
/// Errors: a broker failure (the caller reconnects).
async fn park_returned(
    ctx: &Context,
    queue: &str,
    batch: &[Delivery],
    versions: &[Result<Micros, Malformed>],
) -> Result<usize, String> {
    let out: Vec<Outgoing<'_>> = batch
        .iter()
        .enumerate()
        .filter(|(_, d)| returned_before(d))
        .map(|(i, d)| {
            let version = versions.get(i).and_then(|v| v.as_ref().ok().copied());
            parked_copy(queue, d, version)
        })
        .collect();
    if out.is_empty() {
        return Ok(0);
    }
    ctx.republisher.publish_all(&out).await?;
    metrics::get()
        .parked
        .get_or_create(&Metrics::queue(queue))
        .inc_by(out.len() as u64);
    log::info!(
        "queue={queue}: parked {} deliveries that arrived with x-delivery-count >= 1 (returned by the broker before) as fresh copies",
        out.len()
    );
    Ok(out.len())
}

/// The work queue of edits.
const UPDATE_QUEUE: &str = "update_messages";

/// True when the broker returned `d` to its queue before: it is parked,
/// not processed (see the module documentation).
fn returned_before(d: &Delivery) -> bool {
    delivery_count(&d.properties) >= 1
}

/// The properties of a parked copy of `d`: its own, less the broker's
/// count headers, plus its edit version when it has one.
fn parked_copy<'a>(queue: &str, d: &'a Delivery, version: Option<Micros>) -> Outgoing<'a> {
    let extra: Vec<(&str, AMQPValue)> = version
        .map(|v| (EDIT_VERSION_HEADER, AMQPValue::LongLongInt(v)))
        .into_iter()
        .collect();
    Outgoing {
        queue: queue.to_string(),
        data: &d.data,
        properties: park_properties(&d.properties, &extra),
    }
}

/// Gives `batch` and every delivery the consumer holds back to the queue
/// and stops consuming, so replicas that can reach MySQL take them
/// (README, "Failure semantics": never acked before stored, never dead-lettered;
/// MYSQL_REQUEUE_AFTER): [`park_all`], then [`resume_when_mysql_answers`]
/// follows.
///
/// Returns the pause, counted in `consumers_paused` until it is dropped
/// (by [`resume_when_mysql_answers`], or with the task when a reconnect or
/// shutdown cancels it). Errors: the channel failed (the caller
/// reconnects; the deliveries return to the queue with the channel).
async fn give_back(
    ctx: &Context,
    consumer: &mut BatchConsumer,
    batch: Vec<Delivery>,
    versions: &[Result<Micros, Malformed>],
    in_hand: &InHand,
) -> Result<Paused, String> {
    let queue = consumer.queue().to_string();
    metrics::get()
        .mysql_requeues
        .get_or_create(&Metrics::queue(&queue))
        .inc();
    let n = park_all(ctx, consumer, batch, versions, in_hand).await?;
    log::warn!(
        "mysql: queue={queue} writes failing for at least {} s; gave {n} deliveries back to the queue (parked); consuming again when MySQL answers",
        ctx.mysql_requeue_after.as_secs_f64(),
    );
    Ok(Paused::new())
}

/// On shutdown, gives back what the consumer holds (a batch that could not
/// be written, and what was received but not taken) by [`park_all`]
/// instead of letting the channel's close return it, which a quorum queue
/// counts against its delivery limit. Bounded by [`SHUTDOWN_PARK_TIMEOUT`];
/// on a failure or past it the deliveries return with the channel as
/// before (logged).
async fn park_on_shutdown(
    ctx: &Context,
    consumer: &mut BatchConsumer,
    batch: Vec<Delivery>,
    versions: &[Result<Micros, Malformed>],
    in_hand: &InHand,
) {
    let queue = consumer.queue().to_string();
    let parked = smol::future::or(
        async { Some(park_all(ctx, consumer, batch, versions, in_hand).await) },
        async {
            async_io::Timer::after(SHUTDOWN_PARK_TIMEOUT).await;
            None
        },
    )
    .await;
    match parked {
        Some(Ok(0)) => {}
        Some(Ok(n)) => log::info!(
            "queue={queue}: shutdown: parked {n} deliveries held but not stored (fresh copies in the queue)"
        ),
        Some(Err(e)) => log::warn!(
            "queue={queue}: shutdown: could not park the deliveries held ({e}); they return to the queue with the channel"
        ),
        None => log::warn!(
            "queue={queue}: shutdown: parking the deliveries held took over {} s; they return to the queue with the channel",
            SHUTDOWN_PARK_TIMEOUT.as_secs()
        ),
    }
}

/// How long parking what a consumer holds may take at shutdown.
const SHUTDOWN_PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops the consumer and parks every delivery it holds: `batch` (taken,
/// not written; with its edit versions) and every delivery received but
/// not taken. Each is republished to the queue (confirmed, with its edit
/// version, arrival stamps kept) and all are acked with one `multiple`
/// ack; never `basic.nack` with requeue, which a quorum queue counts
/// against its delivery limit. Deliveries of `batch` that were parked on
/// arrival ([`park_returned`]) are acked, not published again. The previous
/// batch must be settled. Returns how many deliveries were handed back.
///
/// Errors: the channel failed (the deliveries return with it).
async fn park_all(
    ctx: &Context,
    consumer: &mut BatchConsumer,
    batch: Vec<Delivery>,
    versions: &[Result<Micros, Malformed>],
    in_hand: &InHand,
) -> Result<usize, String> {
    let queue = consumer.queue().to_string();
    let m = metrics::get();
    let label = Metrics::queue(&queue);
    let taken = batch.len();
    let parked_on_arrival = batch.iter().filter(|d| returned_before(d)).count();
    // The versions of the batch's edits, by delivery tag.
    let known: std::collections::HashMap<u64, Micros> = batch
        .iter()
        .zip(versions)
        .filter_map(|(d, v)| Some((d.delivery_tag, *v.as_ref().ok()?)))
        .collect();
    let batch_tags: std::collections::HashSet<u64> = batch.iter().map(|d| d.delivery_tag).collect();
    // On an error the batch stays unacked and returns with the channel.
    let all = consumer.cancel_and_take_all(batch).await?;
    let now = now_micros();
    let out: Vec<Outgoing<'_>> = all
        .iter()
        .filter(|d| !(batch_tags.contains(&d.delivery_tag) && returned_before(d)))
        .map(|d| {
            let version = if queue == UPDATE_QUEUE {
                known.get(&d.delivery_tag).copied().or_else(|| {
                    let stamp = consumer
                        .received_stamp(d.delivery_tag)
                        .unwrap_or_else(|| STAMPS.next(now));
                    edit_version(&d.properties, stamp).ok()
                })
            } else {
                None
            };
            parked_copy(&queue, d, version)
        })
        .collect();
    if !out.is_empty() {
        ctx.republisher.publish_all(&out).await?;
    }
    if let Some(last) = all.last() {
        consumer.ack_through(last).await?;
    }
    consumer.forget_stamps();
    in_hand.settled(taken - parked_on_arrival);
    // Deliveries received but not yet taken count as received here.
    m.received
        .get_or_create(&label)
        .inc_by(all.len().saturating_sub(taken) as u64);
    m.parked.get_or_create(&label).inc_by(out.len() as u64);
    Ok(all.len())
}

/// One paused consumer in `chat_writer_consumers_paused`, for as long as
/// this value lives.
struct Paused;

impl Paused {
    fn new() -> Paused {
        metrics::get().consumers_paused.inc();
        Paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        metrics::get().consumers_paused.dec();
    }
}

/// Waits until MySQL answers again (the monitor's probe, or a write error
/// that MySQL itself returned), then consumes again.
///
/// Returns `Ok(true)` once consuming again, `Ok(false)` on shutdown.
/// Errors: the channel failed (the caller reconnects).
async fn resume_when_mysql_answers(
    ctx: &Context,
    consumer: &mut BatchConsumer,
    paused: Paused,
) -> Result<bool, String> {
    let m = metrics::get();
    let paused_at = Instant::now();
    // A short pause even when MySQL already answers (the writes failed
    // with an error MySQL itself returned, such as a lock wait timeout),
    // so the same batch is not taken straight back.
    let mut go_on = ctx.shutdown.sleep(PAUSE_MIN).await;
    while go_on && !m.is_up(Dependency::mysql) {
        go_on = ctx.shutdown.sleep(Duration::from_millis(250)).await;
    }
    let result = if go_on {
        consumer.resume().await.map(|()| {
            log::info!(
                "mysql: queue={} answering again; consuming after a pause of {:.1} s",
                consumer.queue(),
                paused_at.elapsed().as_secs_f64()
            );
            true
        })
    } else {
        Ok(false)
    };
    drop(paused);
    result
}

/// The shortest pause of a consumer that gave its deliveries back.
const PAUSE_MIN: Duration = Duration::from_secs(1);

/// Deliveries of one consumer taken and not yet acked. Whatever is still in
/// hand when the consumer stops (shutdown during a MySQL retry, a broker
/// failure, the task cancelled by a reconnect) was left unacked: it is
/// counted in `chat_writer_deliveries_abandoned_total` when this is dropped,
/// and received again when redelivered.
struct InHand {
    queue: &'static str,
    n: std::cell::Cell<usize>,
}

impl InHand {
    fn new(queue: &str) -> InHand {
        InHand {
            queue: Metrics::queue(queue).queue,
            n: std::cell::Cell::new(0),
        }
    }
    fn taken(&self, n: usize) {
        self.n.set(self.n.get() + n);
    }
    fn settled(&self, n: usize) {
        self.n.set(self.n.get().saturating_sub(n));
    }
}

impl Drop for InHand {
    fn drop(&mut self) {
        let n = self.n.get();
        if n > 0 {
            metrics::get()
                .abandoned
                .get_or_create(&crate::metrics::QueueLabel { queue: self.queue })
                .inc_by(n as u64);
        }
    }
}

/// The settle of the previous batch, still running.
type Settling<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

/// Why a batch was not written; nothing of it is acked.
enum Unwritten {
    /// Shutdown came while the batch could not be written.
    Shutdown,
    /// MySQL kept failing for MYSQL_REQUEUE_AFTER: the batch goes back to
    /// the queue for a replica that can write it.
    Requeue,
}

/// A batch written to MySQL, waiting to be settled.
struct Written {
    started: Instant,
    /// How long the MySQL write took (debug log).
    write_time: Duration,
    now: Micros,
    fates: Vec<Fate>,
    rows: Vec<MessageRow>,
    markers: Markers,
    /// The edit version of each delivery (update queue only; `None` for a
    /// malformed header).
    versions: Vec<Option<Micros>>,
}

#[derive(Default)]
struct Summary {
    stored: usize,
    superseded: usize,
    retried: usize,
    dead_lettered: usize,
    parked: usize,
}

/// Where a delivery goes after the write.
enum Fate {
    Stored,
    /// An edit older than the one its row holds: success, nothing written.
    Superseded,
    Missing(&'static str),
    DeadLetter(String),
    /// Returned by the broker before: a fresh copy was published before
    /// the write (`park_returned`); acked with the batch.
    Parked,
}

async fn write_batch(
    ctx: &Context,
    queue: &str,
    batch: &[Delivery],
    versions: &[Result<Micros, Malformed>],
    consumer: &mut BatchConsumer,
) -> Result<Written, Unwritten> {
    let started = Instant::now();
    let now = now_micros();
    let mut fates: Vec<Fate> = Vec::with_capacity(batch.len());
    let mut markers = Markers::default();
    let mut rows: Vec<MessageRow> = Vec::new();
    // Decoded payloads; a valid one the broker returned before is parked.
    fn usable<T>(r: &Result<T, Malformed>, d: &Delivery) -> bool {
        r.is_ok() && !returned_before(d)
    }
    fn unusable<T>(r: &Result<T, Malformed>) -> Fate {
        match r {
            Err(m) => Fate::DeadLetter(m.0.clone()),
            Ok(_) => Fate::Parked,
        }
    }
    match queue {
        "create_chats" => {
            let decoded: Vec<Result<(CreateChat, Micros), Malformed>> = batch
                .iter()
                .map(|d| CreateChat::decode(&d.data).map(|c| (c, at(d, now))))
                .collect();
            let valid: Vec<(&CreateChat, Micros)> = decoded
                .iter()
                .zip(batch)
                .filter(|(r, d)| usable(r, d))
                .filter_map(|(r, _)| r.as_ref().ok())
                .map(|(c, t)| (c, *t))
                .collect();
            let outcomes =
                retry_in_place(ctx, queue, consumer, || ctx.store.create_chats(&valid)).await?;
            let mut outcomes = outcomes.into_iter();
            for (r, d) in decoded.iter().zip(batch) {
                fates.push(match r {
                    Ok((c, _)) if usable(r, d) => {
                        let o = outcomes
                            .next()
                            .expect("the store returns one outcome per valid payload");
                        if o == Outcome::Stored {
                            markers.chats.push(c.token.clone());
                            markers.messages.push(format!("{}:{}", c.token, c.number));
                        }
                        fate(o, "application")
                    }
                    _ => unusable(r),
                });
            }
        }
        "create_messages" => {
            let decoded: Vec<Result<(CreateMessage, Micros), Malformed>> = batch
                .iter()
                .map(|d| CreateMessage::decode(&d.data).map(|m| (m, at(d, now))))
                .collect();
            let valid: Vec<(&CreateMessage, Micros)> = decoded
                .iter()
                .zip(batch)
                .filter(|(r, d)| usable(r, d))
                .filter_map(|(r, _)| r.as_ref().ok())
                .map(|(m, t)| (m, *t))
                .collect();
            let (outcomes, got) = retry_in_place(ctx, queue, consumer, || {
                ctx.store.create_messages(&valid, ctx.indexing)
            })
            .await?;
            rows = got;
            let mut outcomes = outcomes.into_iter();
            for (r, d) in decoded.iter().zip(batch) {
                fates.push(match r {
                    Ok((m, _)) if usable(r, d) => {
                        let o = outcomes
                            .next()
                            .expect("the store returns one outcome per valid payload");
                        if o == Outcome::Stored {
                            markers
                                .messages
                                .push(format!("{}:{}", m.token, m.chat_number));
                        }
                        fate(o, "chat")
                    }
                    _ => unusable(r),
                });
            }
        }
        _ => {
            let decoded: Vec<Result<(UpdateMessage, Micros), Malformed>> = batch
                .iter()
                .zip(versions)
                .map(|(d, v)| {
                    let u = UpdateMessage::decode(&d.data)?;
                    Ok((u, v.clone()?))
                })
                .collect();
            let valid: Vec<(&UpdateMessage, Micros)> = decoded
                .iter()
                .zip(batch)
                .filter(|(r, d)| usable(r, d))
                .filter_map(|(r, _)| r.as_ref().ok())
                .map(|(u, v)| (u, *v))
                .collect();
            let (outcomes, got) =
                retry_in_place(ctx, queue, consumer, || ctx.store.update_messages(&valid)).await?;
            if ctx.indexing {
                rows = got;
            }
            let mut outcomes = outcomes.into_iter();
            for (r, d) in decoded.iter().zip(batch) {
                fates.push(match r {
                    Ok(_) if usable(r, d) => fate(
                        outcomes
                            .next()
                            .expect("the store returns one outcome per valid payload"),
                        "message",
                    ),
                    _ => unusable(r),
                });
            }
        }
    }

    Ok(Written {
        started,
        write_time: started.elapsed(),
        now,
        fates,
        rows,
        markers,
        versions: versions.iter().map(|v| v.as_ref().ok().copied()).collect(),
    })
}

/// Publishes what the batch left to publish (dead letters, delayed
/// retries, its documents) with confirms, hands its change markers to the
/// Redis flusher, then acks the whole batch with one `multiple` ack.
///
/// Errors: a broker failure; nothing of the batch is acked then.
async fn settle(
    ctx: &Context,
    queue: &str,
    batch: Vec<Delivery>,
    w: Written,
    in_hand: &InHand,
) -> Result<(), String> {
    let Written {
        started,
        write_time,
        now,
        fates,
        rows,
        markers,
        versions,
    } = w;
    // Republish what is not stored, and the documents, with confirms.
    let now_secs = now / 1_000_000;
    let mut summary = Summary::default();
    let mut out: Vec<Outgoing<'_>> = Vec::new();
    for (i, (d, f)) in batch.iter().zip(&fates).enumerate() {
        // Every copy of an edit carries its version (`edit_order`).
        let version = versions.get(i).copied().flatten();
        let versioned = |p: lapin::BasicProperties| match version {
            Some(v) => with_header(p, EDIT_VERSION_HEADER, AMQPValue::LongLongInt(v)),
            None => p,
        };
        match f {
            Fate::Stored => summary.stored += 1,
            Fate::Superseded => summary.superseded += 1,
            // Its copy was published before the write (`park_returned`).
            Fate::Parked => summary.parked += 1,
            Fate::DeadLetter(reason) => {
                summary.dead_lettered += 1;
                let count = retry_count(&d.properties);
                log::warn!(
                    "dead-letter queue={queue} delivery_tag={} reason={reason}",
                    d.delivery_tag
                );
                out.push(Outgoing {
                    queue: dead_letter_queue(queue),
                    data: &d.data,
                    properties: versioned(failure_properties(
                        &d.properties,
                        queue,
                        reason,
                        count,
                        now_secs,
                    )),
                });
            }
            Fate::Missing(what) => {
                let count = retry_count(&d.properties).max(0);
                let tier = usize::try_from(count)
                    .ok()
                    .and_then(|c| ctx.retry_delays.get(c));
                let (target, count, reason) = match tier {
                    Some(delay) => {
                        summary.retried += 1;
                        (
                            retry_queue(queue, *delay),
                            count + 1,
                            format!("{what} not found yet"),
                        )
                    }
                    None => {
                        summary.dead_lettered += 1;
                        let reason = format!("{what} not found after {count} delayed retries");
                        log::warn!(
                            "dead-letter queue={queue} delivery_tag={} reason={reason}",
                            d.delivery_tag
                        );
                        (dead_letter_queue(queue), count, reason)
                    }
                };
                out.push(Outgoing {
                    queue: target,
                    data: &d.data,
                    properties: versioned(failure_properties(
                        &d.properties,
                        queue,
                        &reason,
                        count,
                        now_secs,
                    )),
                });
            }
        }
    }
    let bodies = if ctx.indexing {
        encode_bodies(&rows)
    } else {
        Vec::new()
    };
    if !bodies.is_empty() {
        // The commit time travels with the documents, for the index lag.
        let committed_us = now + write_time.as_micros() as i64;
        let properties = persistent("application/x-ndjson").with_headers(headers_of(&[(
            COMMITTED_US_HEADER,
            AMQPValue::LongLongInt(committed_us),
        )]));
        for docs in &bodies {
            out.push(Outgoing {
                queue: INDEX_QUEUE.to_string(),
                data: docs,
                properties: properties.clone(),
            });
        }
    }
    let publish_started = Instant::now();
    if !out.is_empty() {
        ctx.republisher.publish_all(&out).await?;
    }
    let publish_time = publish_started.elapsed();
    if !markers.chats.is_empty() || !markers.messages.is_empty() {
        // Unbounded channel: only fails if the flusher is gone (shutdown).
        let _ = ctx.markers.try_send(markers);
    }
    let (first, last) = match (batch.first(), batch.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Ok(()),
    };
    last.acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .map_err(|e| format!("ack on {queue}: {e}"))?;
    in_hand.settled(batch.len() - summary.parked);
    record(queue, &batch, &summary, now, write_time);
    log::debug!(
        "batch queue={queue} size={} stored={} superseded={} retried={} dead_lettered={} parked={} first_tag={} last_tag={} write_us={} publish_us={} duration_us={}",
        batch.len(),
        summary.stored,
        summary.superseded,
        summary.retried,
        summary.dead_lettered,
        summary.parked,
        first.delivery_tag,
        last.delivery_tag,
        write_time.as_micros(),
        publish_time.as_micros(),
        started.elapsed().as_micros()
    );
    Ok(())
}

/// Counts a settled batch in the metrics: outcomes, MySQL write time, and
/// the lag from the oldest AMQP `timestamp` (seconds) to the commit.
fn record(queue: &str, batch: &[Delivery], summary: &Summary, now: Micros, write_time: Duration) {
    let m = metrics::get();
    let label = Metrics::queue(queue);
    m.stored
        .get_or_create(&label)
        .inc_by((summary.stored + summary.superseded) as u64);
    if summary.superseded > 0 {
        m.superseded
            .get_or_create(&label)
            .inc_by(summary.superseded as u64);
    }
    m.retried
        .get_or_create(&label)
        .inc_by(summary.retried as u64);
    m.dead_lettered
        .get_or_create(&label)
        .inc_by(summary.dead_lettered as u64);
    m.batch_commit
        .get_or_create(&label)
        .observe(write_time.as_secs_f64());
    if let Some(oldest) = batch.iter().filter_map(|d| *d.properties.timestamp()).min() {
        let committed = (now as f64 + write_time.as_micros() as f64) / 1e6;
        m.publish_to_commit
            .get_or_create(&label)
            .observe((committed - oldest as f64).max(0.0));
    }
}

fn at(d: &Delivery, now: Micros) -> Micros {
    created_at(*d.properties.timestamp(), now)
}

fn fate(o: Outcome, parent: &'static str) -> Fate {
    match o {
        Outcome::Stored => Fate::Stored,
        Outcome::Superseded => Fate::Superseded,
        Outcome::ParentMissing => Fate::Missing(parent),
        Outcome::RowMissing => Fate::Missing("message"),
        Outcome::Rejected(reason) => Fate::DeadLetter(reason),
    }
}

/// How long a MySQL attempt already running when shutdown comes may still
/// take (README, "Failure semantics": the batch already taken is finished and acked).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Waits for `f` up to [`SHUTDOWN_GRACE`]: `Some` if it finished.
async fn within_grace<T>(f: impl Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(f.await) }, async {
        async_io::Timer::after(SHUTDOWN_GRACE).await;
        None
    })
    .await
}

/// One MySQL attempt may take this long before it counts as failed (a
/// server or network that stopped answering would otherwise hang the
/// consumer without a word). Longer than InnoDB's default lock wait (50 s).
const MYSQL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a MySQL write until it succeeds, backing off on infrastructure
/// faults (the only errors the store returns) and on attempts that take
/// over [`MYSQL_ATTEMPT_TIMEOUT`]. On shutdown, the attempt in flight may
/// finish within [`SHUTDOWN_GRACE`] (its batch is then settled and acked);
/// past it, or while backing off, it stops: nothing of the batch is acked,
/// so it is redelivered and written again idempotently.
async fn retry_in_place<T, F, Fut>(
    ctx: &Context,
    queue: &str,
    consumer: &mut BatchConsumer,
    mut write: F,
) -> Result<T, Unwritten>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, mysql_async::Error>>,
{
    let mut backoff = Backoff::default();
    let started = Instant::now();
    loop {
        let attempt = smol::future::or(async { Some(write().await) }, async {
            async_io::Timer::after(MYSQL_ATTEMPT_TIMEOUT).await;
            None
        });
        let mut attempt = std::pin::pin!(attempt);
        // After a failure, deliveries that arrive while the batch waits are
        // pulled and stamped as they arrive (`BatchConsumer::absorb`), so
        // an edit among them keeps the time it arrived if it is given back.
        let waiting = async {
            if backoff.attempts() > 0 {
                smol::future::or(attempt.as_mut(), async {
                    consumer.absorb().await;
                    std::future::pending().await
                })
                .await
            } else {
                attempt.as_mut().await
            }
        };
        let outcome = match ctx.shutdown.race(waiting).await {
            Some(outcome) => Some(outcome),
            // Shutdown while the attempt runs: the batch is taken, so the
            // attempt may finish (a healthy write takes milliseconds) and
            // the batch be acked, rather than leave a committed batch
            // unacked; a server that does not answer within the grace is
            // abandoned (the batch is redelivered, idempotently).
            None => within_grace(attempt.as_mut()).await,
        };
        let error = match outcome {
            None => return Err(Unwritten::Shutdown),
            Some(Some(Ok(v))) => {
                metrics::get().set_up(Dependency::mysql, true);
                if backoff.attempts() > 0 {
                    log::info!(
                        "mysql: queue={queue} write succeeded after {} retries",
                        backoff.attempts()
                    );
                }
                return Ok(v);
            }
            // A server error (deadlock, lock wait) means MySQL answered.
            Some(Some(Err(e))) => (
                format!("{:?}", classify(&e)),
                matches!(e, mysql_async::Error::Server(_)),
            ),
            Some(None) => (
                format!("no answer within {} s", MYSQL_ATTEMPT_TIMEOUT.as_secs()),
                false,
            ),
        };
        let (error, answered) = error;
        let m = metrics::get();
        m.set_up(Dependency::mysql, answered);
        m.write_errors.get_or_create(&Metrics::queue(queue)).inc();
        log::warn!(
            "mysql: queue={queue} error_class=infrastructure retry={} error={error}",
            backoff.attempts() + 1
        );
        let failing_for = started.elapsed();
        if failing_for >= ctx.mysql_requeue_after {
            return Err(Unwritten::Requeue);
        }
        // Sleep the backoff, but wake for one last attempt when the batch
        // is due to go back.
        let delay = backoff
            .next_delay()
            .min(ctx.mysql_requeue_after - failing_for);
        let slept = smol::future::or(ctx.shutdown.sleep(delay), async {
            consumer.absorb().await;
            std::future::pending().await
        })
        .await;
        if !slept {
            return Err(Unwritten::Shutdown);
        }
    }
}
