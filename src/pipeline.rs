//! The batch pipeline of the three work queues: decode, write, republish,
//! mark, ack.
//!
//! For one batch of deliveries from one queue:
//! 1. decode every payload (malformed ones are set aside with the reason);
//! 2. write the valid ones to MySQL in one transaction, retrying in place
//!    with backoff on infrastructure faults (never acking, never
//!    dead-lettering for them);
//! 3. publish, with confirms: malformed and refused messages to
//!    `<queue>.dlq`; messages whose parent or row is missing to the next
//!    delay tier `<queue>.retry.<delay>` (or the `.dlq` after the last);
//!    the batch's documents as one message to the index queue (several if
//!    over 4 MiB);
//! 4. hand the change markers to the Redis flusher;
//! 5. ack the batch with one `multiple` ack.
//!
//! Steps 3–5 of one batch overlap steps 1–2 of the next (see [`run`]). If
//! shutdown comes while step 2 is still retrying, the batch is left unacked
//! and returns to the queue when the channel closes.

use crate::amqp::consumer::BatchConsumer;
use crate::amqp::republish::{
    failure_properties, headers_of, persistent, retry_count, Outgoing, Republisher,
};
use crate::amqp::{dead_letter_queue, retry_queue, INDEX_QUEUE};
use crate::backoff::Backoff;
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
                return Ok(Step::Stop);
            };
            let m = metrics::get();
            let label = Metrics::queue(queue);
            m.received.get_or_create(&label).inc_by(batch.len() as u64);
            in_hand.taken(batch.len());
            m.batch_size
                .get_or_create(&label)
                .observe(batch.len() as f64);
            match write_batch(ctx, queue, &batch).await {
                Ok(written) => Ok::<_, String>(Step::Written(batch, written)),
                Err(Unwritten::Shutdown) => {
                    log::info!(
                        "queue={queue}: shutdown during a retry; {} deliveries left unacked",
                        batch.len()
                    );
                    Ok(Step::Stop)
                }
                Err(Unwritten::Requeue) => Ok(Step::Requeue(batch)),
            }
        };
        let (next, settled) = match settling.take() {
            Some(previous) => smol::future::zip(next, previous).await,
            None => (next.await, Ok(())),
        };
        settled?;
        let (batch, written) = match next? {
            Step::Written(batch, written) => (batch, written),
            Step::Stop => return Ok(()),
            Step::Requeue(batch) => {
                // The previous batch is settled: every unacked delivery on
                // this channel is this batch's or not yet taken.
                let taken = batch.len();
                let requeued = requeue_all(ctx, &mut consumer, batch).await;
                in_hand.settled(taken);
                metrics::get()
                    .abandoned
                    .get_or_create(&Metrics::queue(queue))
                    .inc_by(taken as u64);
                let paused = requeued?;
                if resume_when_mysql_answers(ctx, &mut consumer, paused).await? {
                    continue;
                }
                return Ok(());
            }
        };
        let current = settle(ctx, queue, batch, written, in_hand);
        if ctx.shutdown.is_triggered() {
            return current.await;
        }
        settling = Some(Box::pin(current));
    }
}

/// What taking and writing one batch came to.
enum Step {
    /// Written to MySQL; to be settled.
    Written(Vec<Delivery>, Written),
    /// Shutdown: stop taking batches.
    Stop,
    /// MySQL kept failing: give the batch back ([`requeue_all`]).
    Requeue(Vec<Delivery>),
}

/// Gives `batch` and every delivery the consumer holds back to the queue
/// and stops consuming, so replicas that can reach MySQL take them
/// (CONTRACT section 6: never acked, never dead-lettered;
/// MYSQL_REQUEUE_AFTER). [`resume_when_mysql_answers`] follows.
///
/// Returns the pause, counted in `consumers_paused` until it is dropped
/// (by [`resume_when_mysql_answers`], or with the task when a reconnect or
/// shutdown cancels it). Errors: the channel failed (the caller
/// reconnects; the deliveries return to the queue with the channel).
async fn requeue_all(
    ctx: &Context,
    consumer: &mut BatchConsumer,
    batch: Vec<Delivery>,
) -> Result<Paused, String> {
    let m = metrics::get();
    m.mysql_requeues
        .get_or_create(&Metrics::queue(consumer.queue()))
        .inc();
    let n = consumer.requeue_all_and_pause(batch).await?;
    log::warn!(
        "mysql: queue={} writes failing for at least {} s; gave {n} deliveries back to the queue; consuming again when MySQL answers",
        consumer.queue(),
        ctx.mysql_requeue_after.as_secs_f64()
    );
    Ok(Paused::new())
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
}

#[derive(Default)]
struct Summary {
    stored: usize,
    retried: usize,
    dead_lettered: usize,
}

/// Where a delivery goes after the write.
enum Fate {
    Stored,
    Missing(&'static str),
    DeadLetter(String),
}

async fn write_batch(ctx: &Context, queue: &str, batch: &[Delivery]) -> Result<Written, Unwritten> {
    let started = Instant::now();
    let now = now_micros();
    let mut fates: Vec<Fate> = Vec::with_capacity(batch.len());
    let mut markers = Markers::default();
    let mut rows: Vec<MessageRow> = Vec::new();
    match queue {
        "create_chats" => {
            let decoded: Vec<Result<(CreateChat, Micros), Malformed>> = batch
                .iter()
                .map(|d| CreateChat::decode(&d.data).map(|c| (c, at(d, now))))
                .collect();
            let valid: Vec<(&CreateChat, Micros)> = decoded
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|(c, t)| (c, *t))
                .collect();
            let outcomes = retry_in_place(ctx, queue, || ctx.store.create_chats(&valid)).await?;
            let mut outcomes = outcomes.into_iter();
            for r in &decoded {
                fates.push(match r {
                    Err(m) => Fate::DeadLetter(m.0.clone()),
                    Ok((c, _)) => {
                        let o = outcomes
                            .next()
                            .expect("the store returns one outcome per valid payload");
                        if o == Outcome::Stored {
                            markers.chats.push(c.token.clone());
                            markers.messages.push(format!("{}:{}", c.token, c.number));
                        }
                        fate(o, "application")
                    }
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
                .filter_map(|r| r.as_ref().ok())
                .map(|(m, t)| (m, *t))
                .collect();
            let (outcomes, got) = retry_in_place(ctx, queue, || {
                ctx.store.create_messages(&valid, ctx.indexing)
            })
            .await?;
            rows = got;
            let mut outcomes = outcomes.into_iter();
            for r in &decoded {
                fates.push(match r {
                    Err(m) => Fate::DeadLetter(m.0.clone()),
                    Ok((m, _)) => {
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
                });
            }
        }
        _ => {
            let decoded: Vec<Result<UpdateMessage, Malformed>> = batch
                .iter()
                .map(|d| UpdateMessage::decode(&d.data))
                .collect();
            let valid: Vec<&UpdateMessage> =
                decoded.iter().filter_map(|r| r.as_ref().ok()).collect();
            let (outcomes, got) =
                retry_in_place(ctx, queue, || ctx.store.update_messages(&valid)).await?;
            if ctx.indexing {
                rows = got;
            }
            let mut outcomes = outcomes.into_iter();
            for r in &decoded {
                fates.push(match r {
                    Err(m) => Fate::DeadLetter(m.0.clone()),
                    Ok(_) => fate(
                        outcomes
                            .next()
                            .expect("the store returns one outcome per valid payload"),
                        "message",
                    ),
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
    } = w;
    // Republish what is not stored, and the documents, with confirms.
    let now_secs = now / 1_000_000;
    let mut summary = Summary::default();
    let mut out: Vec<Outgoing<'_>> = Vec::new();
    for (d, f) in batch.iter().zip(&fates) {
        match f {
            Fate::Stored => summary.stored += 1,
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
                    properties: failure_properties(&d.properties, queue, reason, count, now_secs),
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
                    properties: failure_properties(&d.properties, queue, &reason, count, now_secs),
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
    in_hand.settled(batch.len());
    record(queue, &batch, &summary, now, write_time);
    log::debug!(
        "batch queue={queue} size={} stored={} retried={} dead_lettered={} first_tag={} last_tag={} write_us={} publish_us={} duration_us={}",
        batch.len(),
        summary.stored,
        summary.retried,
        summary.dead_lettered,
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
    m.stored.get_or_create(&label).inc_by(summary.stored as u64);
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
        Outcome::ParentMissing => Fate::Missing(parent),
        Outcome::RowMissing => Fate::Missing("message"),
        Outcome::Rejected(reason) => Fate::DeadLetter(reason),
    }
}

/// How long a MySQL attempt already running when shutdown comes may still
/// take (CONTRACT section 6: the batch already taken is finished and acked).
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
async fn retry_in_place<T, F, Fut>(ctx: &Context, queue: &str, mut write: F) -> Result<T, Unwritten>
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
        let outcome = match ctx.shutdown.race(attempt.as_mut()).await {
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
        if !ctx.shutdown.sleep(delay).await {
            return Err(Unwritten::Shutdown);
        }
    }
}
