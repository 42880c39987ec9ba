//! A consumer that hands out batches.
//!
//! `next_batch` waits for one delivery, then takes every delivery already
//! received (up to the prefetch) without waiting for more: under load a
//! batch fills itself, when idle a batch of one goes out at once. There is
//! no timer to fill batches. A batch is settled with one `multiple` ack of
//! its last delivery tag (the channel is this consumer's own, and batches
//! are settled in order, so every earlier tag belongs to a settled batch).

use crate::shutdown::Shutdown;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use smol::stream::StreamExt;

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
            max: usize::from(prefetch),
            failed: None,
        })
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next batch: at least one delivery, at most the prefetch.
    ///
    /// Returns `Ok(None)` when shutdown is triggered before a delivery
    /// arrives (nothing taken). Errors: the channel or connection failed or
    /// the broker cancelled the consumer; the caller reconnects.
    pub async fn next_batch(
        &mut self,
        shutdown: &Shutdown,
    ) -> Result<Option<Vec<Delivery>>, String> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let first = smol::future::or(async { Some(self.consumer.next().await) }, async {
            shutdown.wait().await;
            None
        })
        .await;
        let first = match first {
            None => return Ok(None),
            Some(None) => {
                return Err(format!(
                    "consumer of {} was cancelled or its channel closed",
                    self.queue
                ))
            }
            Some(Some(Err(e))) => return Err(format!("consumer of {}: {e}", self.queue)),
            Some(Some(Ok(d))) => d,
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
        Ok(Some(batch))
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
