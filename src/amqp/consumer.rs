//! A consumer that hands out batches.
//!
//! `next_batch` waits for one delivery, then takes every delivery already
//! received, up to half the prefetch, without waiting for more: under load
//! a batch fills itself, when idle a batch of one goes out at once. There is
//! no timer to fill batches. Half, so that while one batch is being written
//! and acked the broker can already deliver the next. A batch is settled with one `multiple` ack of
//! its last delivery tag (the channel is this consumer's own, and batches
//! are settled in order, so every earlier tag belongs to a settled batch).
//! The index queue's consumer is opened adjustable instead: a batch may
//! take all of its prefetch, and the prefetch follows the size of its
//! messages (a per-consumer limit, changed by cancelling and consuming
//! again on the same channel, so nothing unacked is given back).

use crate::edit_order::STAMPS;
use crate::shutdown::Shutdown;
use crate::time::{now_micros, Micros};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use smol::stream::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// What [`BatchConsumer::next`] found.
pub enum Next {
    /// At least one delivery, at most the prefetch.
    Batch(Vec<Delivery>),
    /// Nothing arrived within the idle time.
    Idle,
    /// Shutdown was triggered before a delivery arrived.
    Shutdown,
}

#[allow(clippy::large_enum_variant)] // short-lived, on the stack once per batch
enum Wait {
    Delivery(Option<lapin::Result<Delivery>>),
    Shutdown,
    Idle,
}

/// One queue's consumer on its own channel.
pub struct BatchConsumer {
    queue: String,
    channel: Channel,
    /// The consumer tag; `set_prefetch` consumes again under `<tag>.<n>`.
    tag: String,
    /// How many times the consumer was re-opened by `set_prefetch`.
    reopened: u32,
    prefetch: u16,
    consumer: Consumer,
    max: usize,
    /// Deliveries the consumer had received when `set_prefetch` cancelled
    /// it: still unacked on this channel, handed out first (their tags are
    /// lower than any the new consumer gets).
    carried: VecDeque<Delivery>,
    /// When each delivery in `carried` was received (a receive stamp from
    /// `edit_order::STAMPS`), by delivery tag: deliveries pulled from the
    /// stream before they are taken ([`BatchConsumer::absorb`],
    /// cancelling) keep the time they arrived, not the time they are taken.
    carried_stamps: HashMap<u64, Micros>,
    /// The receive stamps of the last batch's deliveries that came from
    /// `carried`.
    batch_stamps: HashMap<u64, Micros>,
    /// The highest delivery tag pulled from the stream so far.
    last_tag: u64,
    /// Set by a cancel: the highest tag pulled before it. A quorum queue
    /// may still send deliveries for the cancelled consumer after
    /// `cancel-ok`; lapin drops those (its consumer is gone), so they stay
    /// unacked on the channel, invisible, and a later `multiple` ack would
    /// ack them unprocessed. Their tags are the gap between this one and
    /// the first delivery of the next consumer: they are handed back then
    /// ([`BatchConsumer::pulled`]).
    strays_after: Option<u64>,
    /// A failure seen while filling a batch, reported on the next call.
    failed: Option<String>,
}

impl BatchConsumer {
    /// Opens a channel with a per-consumer `basic.qos(prefetch)` and starts
    /// consuming `queue` (manual acks); a batch takes up to half the
    /// prefetch (rounded up).
    pub async fn open(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> lapin::Result<BatchConsumer> {
        let mut c = Self::open_adjustable(conn, queue, prefetch).await?;
        c.max = usize::from(prefetch).div_ceil(2);
        Ok(c)
    }

    /// Like [`BatchConsumer::open`], but a batch takes every delivery
    /// received, up to the whole prefetch, and the prefetch can be changed
    /// while consuming ([`BatchConsumer::set_prefetch`]).
    pub async fn open_adjustable(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> lapin::Result<BatchConsumer> {
        let channel = conn.create_channel().await?;
        let prefetch = prefetch.max(1);
        // Per consumer (`global = false`): a channel-wide limit is refused
        // on quorum queues (540 NOT_IMPLEMENTED, closing the connection)
        // and deprecated in RabbitMQ 4.
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("chat-writer.{queue}.{}", std::process::id());
        let consumer = consume(&channel, queue, &tag).await?;
        Ok(BatchConsumer {
            queue: queue.to_string(),
            channel,
            tag,
            reopened: 0,
            prefetch,
            consumer,
            max: usize::from(prefetch),
            carried: VecDeque::new(),
            carried_stamps: HashMap::new(),
            batch_stamps: HashMap::new(),
            last_tag: 0,
            strays_after: None,
            failed: None,
        })
    }

    /// The current prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// Changes the prefetch of a consumer opened with
    /// [`BatchConsumer::open_adjustable`]; batches then take up to
    /// `prefetch` deliveries. A per-consumer limit is fixed when the
    /// consumer starts, so this sets `basic.qos` for the channel's next
    /// consumer, cancels the current one (`basic.cancel`, waiting for
    /// `cancel-ok`), keeps the deliveries it had received (unacked, handed
    /// out before any new one) and consumes again: three round trips to the
    /// broker. Nothing returns to the queue.
    ///
    /// Errors: the channel is gone, or the cancelled consumer's stream did
    /// not end within 5 s; the caller reconnects (unacked deliveries return
    /// to the queue).
    pub async fn set_prefetch(&mut self, prefetch: u16) -> Result<(), String> {
        let prefetch = prefetch.max(1);
        if prefetch == self.prefetch {
            return Ok(());
        }
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos on {}: {e}", self.queue))?;
        self.cancel_and_carry().await?;
        self.consume_again().await?;
        self.prefetch = prefetch;
        self.max = usize::from(prefetch);
        Ok(())
    }

    /// Stops consuming and hands out every delivery this consumer holds,
    /// for a writer that cannot store them (MySQL unreachable for
    /// MYSQL_REQUEUE_AFTER): cancels the consumer (`basic.cancel`, waiting
    /// for `cancel-ok`) and returns `held` (a batch taken and not acked)
    /// followed by every delivery received but not yet taken, in delivery
    /// order, all still unacked. The caller parks them (republishes each to
    /// its queue, confirmed) and acks them with one `multiple` ack of the
    /// last, so other consumers get them; never `basic.nack` with requeue,
    /// which a quorum queue counts against its delivery limit. Every
    /// earlier batch must be settled first (acks are in order on this
    /// channel). [`BatchConsumer::resume`] consumes again.
    ///
    /// Errors: the channel is gone (the caller reconnects; the deliveries
    /// return to the queue with the channel).
    pub async fn cancel_and_take_all(
        &mut self,
        mut held: Vec<Delivery>,
    ) -> Result<Vec<Delivery>, String> {
        self.cancel_and_carry().await?;
        held.extend(self.carried.drain(..));
        held.sort_by_key(|d| d.delivery_tag);
        Ok(held)
    }

    /// The receive stamp of delivery `tag` of the last batch or of those
    /// handed out by [`BatchConsumer::cancel_and_take_all`], if it was
    /// pulled from the stream before it was taken; `None` for a delivery
    /// taken as it was pulled (its receive time is the time it was taken).
    pub fn received_stamp(&self, tag: u64) -> Option<Micros> {
        self.batch_stamps
            .get(&tag)
            .or_else(|| self.carried_stamps.get(&tag))
            .copied()
    }

    /// Forgets the stamps of deliveries handed out by
    /// [`BatchConsumer::cancel_and_take_all`] (once they are settled).
    pub fn forget_stamps(&mut self) {
        self.carried_stamps.clear();
        self.batch_stamps.clear();
    }

    /// Pulls every delivery the broker sends into `carried`, stamped as it
    /// arrives, until dropped; never returns (a failure is kept for the
    /// next call of [`BatchConsumer::next`]). Run beside a long wait (a
    /// MySQL write being retried) so the deliveries that arrive meanwhile
    /// keep the time they arrived. Dropping it is safe: nothing is lost.
    pub async fn absorb(&mut self) {
        loop {
            if self.failed.is_some() {
                return std::future::pending().await;
            }
            match self.consumer.next().await {
                Some(Ok(d)) => {
                    if let Err(e) = self.pulled(d.delivery_tag).await {
                        self.failed = Some(e);
                    }
                    self.carry(d)
                }
                Some(Err(e)) => self.failed = Some(format!("consumer of {}: {e}", self.queue)),
                None => {
                    self.failed = Some(format!(
                        "consumer of {} was cancelled or its channel closed",
                        self.queue
                    ))
                }
            }
        }
    }

    /// Notes that delivery `tag` came from the stream. The first one after
    /// a cancel reveals the deliveries the broker sent the cancelled
    /// consumer (see `strays_after`): each tag between is handed back with
    /// `basic.nack` (requeue, one by one; a nack, not a reject, which
    /// RabbitMQ 4.3 counts as a failed delivery), before anything later is
    /// acked. A quorum queue counts that return; the delivery is parked
    /// when it comes back.
    ///
    /// Errors: the channel is gone.
    async fn pulled(&mut self, tag: u64) -> Result<(), String> {
        if let Some(after) = self.strays_after.take() {
            let strays = after + 1..tag;
            if !strays.is_empty() {
                log::warn!(
                    "queue={}: {} deliveries arrived for a cancelled consumer (tags {}..={}); returned to the queue",
                    self.queue,
                    strays.end - strays.start,
                    strays.start,
                    strays.end - 1
                );
            }
            for t in strays {
                self.channel
                    .basic_nack(
                        t,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await
                    .map_err(|e| format!("basic.nack on {}: {e}", self.queue))?;
            }
        }
        self.last_tag = self.last_tag.max(tag);
        Ok(())
    }

    fn carry(&mut self, d: Delivery) {
        self.carried_stamps
            .insert(d.delivery_tag, STAMPS.next(now_micros()));
        self.carried.push_back(d);
    }

    /// Moves a delivery out of `carried` into the batch being taken, with
    /// its stamp.
    fn take_carried(&mut self) -> Option<Delivery> {
        let d = self.carried.pop_front()?;
        if let Some(s) = self.carried_stamps.remove(&d.delivery_tag) {
            self.batch_stamps.insert(d.delivery_tag, s);
        }
        Some(d)
    }

    /// Consumes again after [`BatchConsumer::cancel_and_take_all`], with
    /// the same prefetch. Errors: the channel is gone.
    pub async fn resume(&mut self) -> Result<(), String> {
        self.consume_again().await
    }

    /// Cancels the current consumer and keeps the deliveries it had
    /// received (still unacked on this channel) in `carried`.
    async fn cancel_and_carry(&mut self) -> Result<(), String> {
        let queue = self.queue.clone();
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} on {queue}: {e}");
        let current = self.current_tag();
        self.channel
            .basic_cancel(current.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(|e| fail("basic.cancel", &e))?;
        // lapin ends the stream once cancel-ok is in, after the deliveries
        // already received: keep them.
        loop {
            let next = smol::future::or(async { Some(self.consumer.next().await) }, async {
                async_io::Timer::after(Duration::from_secs(5)).await;
                None
            })
            .await;
            match next {
                Some(Some(Ok(d))) => {
                    self.last_tag = self.last_tag.max(d.delivery_tag);
                    self.carry(d)
                }
                Some(None) => {
                    self.strays_after = Some(self.last_tag);
                    return Ok(());
                }
                Some(Some(Err(e))) => return Err(fail("cancelled consumer", &e)),
                None => return Err(fail("cancelled consumer", &"no end within 5 s")),
            }
        }
    }

    /// `basic.consume` again on this channel under the next tag.
    async fn consume_again(&mut self) -> Result<(), String> {
        self.reopened += 1;
        self.consumer = consume(&self.channel, &self.queue, &self.current_tag())
            .await
            .map_err(|e| format!("basic.consume on {}: {e}", self.queue))?;
        Ok(())
    }

    /// Messages ready in the queue (not delivered), by a passive
    /// `queue.declare` on this consumer's channel. Errors: the channel is
    /// gone.
    pub async fn ready_count(&self) -> Result<u32, String> {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .map_err(|e| format!("passive declare of {}: {e}", self.queue))
    }

    fn current_tag(&self) -> String {
        match self.reopened {
            0 => self.tag.clone(),
            n => format!("{}.{n}", self.tag),
        }
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next batch: at least one delivery, at most half the prefetch
    /// (rounded up).
    ///
    /// Returns `Ok(None)` when shutdown is triggered before a delivery
    /// arrives (nothing taken). Errors: the channel or connection failed or
    /// the broker cancelled the consumer; the caller reconnects.
    pub async fn next_batch(
        &mut self,
        shutdown: &Shutdown,
    ) -> Result<Option<Vec<Delivery>>, String> {
        match self.next(shutdown, None).await? {
            Next::Batch(b) => Ok(Some(b)),
            Next::Idle | Next::Shutdown => Ok(None),
        }
    }

    /// Like [`BatchConsumer::next_batch`], but also returns [`Next::Idle`]
    /// when nothing arrives within `idle` (if given). Dropping the wait is
    /// safe: nothing is taken from the stream until it is returned.
    pub async fn next(
        &mut self,
        shutdown: &Shutdown,
        idle: Option<Duration>,
    ) -> Result<Next, String> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // Checked first: after a shutdown signal no new batch is taken,
        // even when deliveries are waiting (they return to the queue).
        if shutdown.is_triggered() {
            return Ok(Next::Shutdown);
        }
        self.batch_stamps.clear();
        let first = match self.take_carried() {
            Some(d) => d,
            None => match self.wait_first(shutdown, idle).await? {
                Ok(d) => {
                    self.pulled(d.delivery_tag).await?;
                    d
                }
                Err(next) => return Ok(next),
            },
        };
        let mut batch = Vec::with_capacity(self.max.min(64));
        batch.push(first);
        while batch.len() < self.max {
            if let Some(d) = self.take_carried() {
                batch.push(d);
                continue;
            }
            match smol::future::poll_once(self.consumer.next()).await {
                Some(Some(Ok(d))) => {
                    let pulled = self.pulled(d.delivery_tag).await;
                    batch.push(d);
                    if let Err(e) = pulled {
                        self.failed = Some(e);
                        break;
                    }
                }
                None => break,
                // Settle what was taken first; report the failure next call.
                Some(Some(Err(e))) => {
                    self.failed = Some(format!("consumer of {}: {e}", self.queue));
                    break;
                }
                Some(None) => {
                    self.failed = Some(format!(
                        "consumer of {} was cancelled or its channel closed",
                        self.queue
                    ));
                    break;
                }
            }
        }
        Ok(Next::Batch(batch))
    }

    /// Waits for the stream's next delivery: `Ok(Err(_))` for shutdown or
    /// idle, `Err` for a failed or cancelled consumer.
    async fn wait_first(
        &mut self,
        shutdown: &Shutdown,
        idle: Option<Duration>,
    ) -> Result<Result<Delivery, Next>, String> {
        let idle_timer = async {
            match idle {
                Some(d) => {
                    async_io::Timer::after(d).await;
                }
                None => std::future::pending::<()>().await,
            }
            Wait::Idle
        };
        let shutdown_wait = async {
            shutdown.wait().await;
            Wait::Shutdown
        };
        let delivery = async { Wait::Delivery(self.consumer.next().await) };
        match smol::future::or(delivery, smol::future::or(shutdown_wait, idle_timer)).await {
            Wait::Shutdown => Ok(Err(Next::Shutdown)),
            Wait::Idle => Ok(Err(Next::Idle)),
            Wait::Delivery(None) => Err(format!(
                "consumer of {} was cancelled or its channel closed",
                self.queue
            )),
            Wait::Delivery(Some(Err(e))) => Err(format!("consumer of {}: {e}", self.queue)),
            Wait::Delivery(Some(Ok(d))) => Ok(Ok(d)),
        }
    }

    /// Acks every delivery up to and including `last` (`multiple = true`).
    ///
    /// Errors: the channel is gone; the deliveries return to the queue and
    /// are processed again, idempotently.
    pub async fn ack_through(&self, last: &Delivery) -> Result<(), String> {
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map(|_| ())
            .map_err(|e| format!("ack on {}: {e}", self.queue))
    }
}

/// `basic.consume` of `queue` under `tag` (manual acks).
async fn consume(channel: &Channel, queue: &str, tag: &str) -> lapin::Result<Consumer> {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}
