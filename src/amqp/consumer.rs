//! A consumer that hands out batches.
//!
//! `next_batch` waits for one delivery, then takes every delivery already
//! received, up to half the prefetch, without waiting for more: under load
//! a batch fills itself, when idle a batch of one goes out at once. There is
//! no timer to fill batches. Half, so that while one batch is being written
//! and acked the broker can already deliver the next. A batch is settled with one `multiple` ack of
//! its last delivery tag (the channel is this consumer's own, and batches
//! are settled in order, so every earlier tag belongs to a settled batch).

use crate::shutdown::Shutdown;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use smol::stream::StreamExt;
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
    _channel: Channel,
    consumer: Consumer,
    max: usize,
    /// A failure seen while filling a batch, reported on the next call.
    failed: Option<String>,
}

impl BatchConsumer {
    /// Opens a channel with `basic.qos(prefetch)` and starts consuming
    /// `queue` (manual acks).
    pub async fn open(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> lapin::Result<BatchConsumer> {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("chat-writer.{queue}.{}", std::process::id());
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(BatchConsumer {
            queue: queue.to_string(),
            _channel: channel,
            consumer,
            max: usize::from(prefetch).div_ceil(2),
            failed: None,
        })
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
        let first = match smol::future::or(delivery, smol::future::or(shutdown_wait, idle_timer))
            .await
        {
            Wait::Shutdown => return Ok(Next::Shutdown),
            Wait::Idle => return Ok(Next::Idle),
            Wait::Delivery(None) => {
                return Err(format!(
                    "consumer of {} was cancelled or its channel closed",
                    self.queue
                ))
            }
            Wait::Delivery(Some(Err(e))) => return Err(format!("consumer of {}: {e}", self.queue)),
            Wait::Delivery(Some(Ok(d))) => d,
        };
        let mut batch = Vec::with_capacity(self.max.min(64));
        batch.push(first);
        while batch.len() < self.max {
            match smol::future::poll_once(self.consumer.next()).await {
                Some(Some(Ok(d))) => batch.push(d),
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
