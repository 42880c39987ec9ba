//! RabbitMQ helpers (lapin on smol): publish with confirms, basic_get.

use std::collections::BTreeMap;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// The AMQP connection name of the harness's own connections, so fault
/// injection can spare them (see `faults::close_writer_connections`).
pub const HARNESS_CONNECTION_NAME: &str = "cwt-harness";

pub struct Amqp {
    pub conn: Connection,
    /// Publishing channel, publisher confirms on.
    pub ch: Channel,
    pub vhost: String,
}

/// A message read with basic_get.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: Vec<u8>,
    pub headers: BTreeMap<String, AMQPValue>,
    pub timestamp: Option<u64>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
}

impl Got {
    /// A header as a string (LongString/ShortString), `None` if absent or
    /// of another type.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.headers.get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    /// A header as an integer (any AMQP integer or timestamp type).
    pub fn header_int(&self, name: &str) -> Option<i64> {
        Some(match self.headers.get(name)? {
            AMQPValue::ShortShortInt(v) => *v as i64,
            AMQPValue::ShortShortUInt(v) => *v as i64,
            AMQPValue::ShortInt(v) => *v as i64,
            AMQPValue::ShortUInt(v) => *v as i64,
            AMQPValue::LongInt(v) => *v as i64,
            AMQPValue::LongUInt(v) => *v as i64,
            AMQPValue::LongLongInt(v) => *v,
            AMQPValue::Timestamp(v) => *v as i64,
            _ => return None,
        })
    }
}

impl Amqp {
    pub async fn connect(url: &str, vhost: &str) -> Amqp {
        let props =
            ConnectionProperties::default().with_connection_name(HARNESS_CONNECTION_NAME.into());
        let conn = Connection::connect(url, props)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let ch = conn.create_channel().await.expect("create channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        Amqp {
            conn,
            ch,
            vhost: vhost.to_string(),
        }
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }

    /// Declares `queue` durable with no arguments, as the API and the writer do.
    pub async fn declare(&self, queue: &str) {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
    }

    /// Declares `queue` durable with the given arguments.
    pub async fn declare_with_args(&self, queue: &str, args: FieldTable) {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
    }

    /// Declares `queue` as a durable quorum queue; `delivery_limit` sets
    /// `x-delivery-limit` (a delivery returned more often than that is
    /// dropped, or dead-lettered when the queue has a dead-letter exchange).
    pub async fn declare_quorum(&self, queue: &str, delivery_limit: Option<i64>) {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(limit) = delivery_limit {
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        self.declare_with_args(queue, args).await;
    }

    /// Declares the three work queues (durable, no arguments).
    pub async fn declare_work_queues(&self) {
        for q in super::WORK_QUEUES {
            self.declare(q).await;
        }
    }

    /// Publishes `payload` to the default exchange with routing key `queue`:
    /// persistent, `application/json`, optional AMQP `timestamp` (seconds),
    /// and waits for the broker's confirm. The queue must exist.
    pub async fn publish(&self, queue: &str, payload: &[u8], timestamp: Option<u64>) {
        self.publish_nowait(queue, payload, timestamp)
            .await
            .await
            .unwrap_or_else(|e| panic!("confirm of publish to {queue}: {e}"));
    }

    /// Publishes and returns the pending confirm.
    pub async fn publish_nowait(
        &self,
        queue: &str,
        payload: &[u8],
        timestamp: Option<u64>,
    ) -> lapin::PublisherConfirm {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(ts) = timestamp {
            props = props.with_timestamp(ts);
        }
        self.ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {queue}: {e}"))
    }

    /// Publishes with the given properties (headers, timestamp, ...) and
    /// waits for the confirm.
    pub async fn publish_props(&self, queue: &str, payload: &[u8], props: BasicProperties) {
        self.ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {queue}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("confirm of publish to {queue}: {e}"));
    }

    /// Publishes `payload` like [`Amqp::publish`] (persistent,
    /// `application/json`, optional AMQP `timestamp`) with `headers`, and
    /// waits for the broker's confirm.
    pub async fn publish_with_headers(
        &self,
        queue: &str,
        payload: &[u8],
        timestamp: Option<u64>,
        headers: FieldTable,
    ) {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(ts) = timestamp {
            props = props.with_timestamp(ts);
        }
        self.publish_props(queue, payload, props).await
    }

    /// Publishes a JSON value.
    pub async fn publish_json(&self, queue: &str, v: &serde_json::Value, timestamp: Option<u64>) {
        self.publish(queue, v.to_string().as_bytes(), timestamp)
            .await
    }

    /// `(ready messages, consumers)` of `queue`, `None` if it does not exist.
    /// Uses a throw-away channel: a passive declare of a missing queue
    /// closes the channel.
    pub async fn queue_info(&self, queue: &str) -> Option<(u32, u32)> {
        let ch = self.conn.create_channel().await.expect("create channel");
        let r = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let info = r.ok().map(|q| (q.message_count(), q.consumer_count()));
        if info.is_some() {
            let _ = ch.close(200, "bye".into()).await;
        }
        info
    }

    /// Takes (and acks) one message from `queue`; `None` if the queue is
    /// empty or does not exist.
    pub async fn get(&self, queue: &str) -> Option<Got> {
        let ch = self.conn.create_channel().await.expect("create channel");
        let r = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await;
        let msg = match r {
            Ok(Some(m)) => m,
            Ok(None) => {
                let _ = ch.close(200, "bye".into()).await;
                return None;
            }
            Err(_) => return None,
        };
        let d = msg.delivery;
        d.ack(BasicAckOptions::default()).await.expect("ack");
        let _ = ch.close(200, "bye".into()).await;
        Some(to_got(&d))
    }

    /// Takes (and acks) every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut all = Vec::new();
        while let Some(g) = self.get(queue).await {
            all.push(g);
        }
        all
    }

    /// Reads every message in `queue` without removing it: gets them all
    /// unacked on one channel, then closes the channel so they are requeued.
    pub async fn peek_all(&self, queue: &str) -> Vec<Got> {
        let ch = self.conn.create_channel().await.expect("create channel");
        let mut all = Vec::new();
        while let Ok(Some(m)) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            all.push(to_got(&m.delivery));
        }
        let _ = ch.close(200, "requeue".into()).await;
        all
    }
}

fn to_got(d: &lapin::message::Delivery) -> Got {
    let headers = d
        .properties
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    Got {
        body: d.data.clone(),
        headers,
        timestamp: *d.properties.timestamp(),
        content_type: d
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_string()),
        delivery_mode: *d.properties.delivery_mode(),
    }
}
