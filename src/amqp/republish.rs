//! Publishing with publisher confirms: dead letters, delayed retries and
//! index operations.
//!
//! Every message the writer publishes is `mandatory` (an unroutable message
//! comes back instead of vanishing) and confirmed by the broker before the
//! delivery it stands for is acked (README, "Failure semantics", last line). Dead
//! letters and retries keep the body byte for byte and the original
//! properties and headers, and carry `x-retry-count`, `x-original-queue`,
//! `x-error` and `x-first-failure` (docs/queues-and-payloads.md, Topology).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

/// One message to publish to the default exchange.
pub struct Outgoing<'a> {
    /// Target queue (routing key on the default exchange).
    pub queue: String,
    /// Body bytes.
    pub data: &'a [u8],
    /// Properties, headers included.
    pub properties: BasicProperties,
}

/// A confirm-mode channel shared by the consumers of one connection.
#[derive(Clone)]
pub struct Republisher {
    channel: Channel,
}

impl Republisher {
    /// Opens a channel on `conn` and turns on publisher confirms.
    pub async fn open(conn: &Connection) -> lapin::Result<Republisher> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Republisher { channel })
    }

    /// Publishes every message, then waits for all confirms.
    ///
    /// Errors: a channel or connection failure, a broker nack, or a message
    /// returned as unroutable, as one line. The caller must not ack what
    /// these messages stand for; it reconnects (which redeclares queues).
    pub async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), String> {
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    m.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    m.data,
                    m.properties.clone(),
                )
                .await
                .map_err(|e| format!("publish to {}: {e}", m.queue))?;
            pending.push((m.queue.as_str(), confirm));
        }
        for (queue, confirm) in pending {
            match confirm
                .await
                .map_err(|e| format!("confirm from {queue}: {e}"))?
            {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(format!("{queue}: message returned as unroutable"))
                }
                Confirmation::Nack(_) => return Err(format!("{queue}: broker nacked the publish")),
            }
        }
        Ok(())
    }
}

/// Headers the broker adds to a delivery of a quorum queue: how often it
/// was returned or acquired before (RabbitMQ 3.10+; `x-acquired-count`
/// from 4.3). A copy the writer publishes is a new message: it must not
/// carry them, or it would look returned already.
pub const BROKER_COUNT_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// `x-delivery-count` of a delivery: how many times a quorum queue had
/// returned it before this delivery, the count its delivery limit is
/// checked against (0 when absent: a classic queue, or a first delivery).
pub fn delivery_count(props: &BasicProperties) -> i64 {
    header(props, "x-delivery-count")
        .and_then(as_i64)
        .unwrap_or(0)
}

/// The properties of a parked copy of a delivery (see
/// `pipeline`, parking): every original property and header, without the
/// [`BROKER_COUNT_HEADERS`], plus `extra` headers.
pub fn park_properties(original: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    strip_broker_counts(&mut headers);
    for (k, v) in extra {
        headers.insert((*k).into(), v.clone());
    }
    original.clone().with_headers(headers)
}

/// `p` with the header `name` set to `value`.
pub fn with_header(p: BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = p.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    p.with_headers(headers)
}

fn strip_broker_counts(headers: &mut FieldTable) {
    if BROKER_COUNT_HEADERS
        .iter()
        .any(|h| headers.inner().contains_key(*h))
    {
        let mut kept = FieldTable::default();
        for (k, v) in headers.inner() {
            if !BROKER_COUNT_HEADERS.contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
        *headers = kept;
    }
}

/// `x-retry-count` of a delivery (0 when absent or not an integer).
pub fn retry_count(props: &BasicProperties) -> i64 {
    header(props, "x-retry-count").and_then(as_i64).unwrap_or(0)
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

/// An AMQP integer header value of any width as `i64`; `None` for any
/// other type (a string, a float, a timestamp, …).
pub fn amqp_integer(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => i64::from(*x),
        AMQPValue::ShortShortUInt(x) => i64::from(*x),
        AMQPValue::ShortInt(x) => i64::from(*x),
        AMQPValue::ShortUInt(x) => i64::from(*x),
        AMQPValue::LongInt(x) => i64::from(*x),
        AMQPValue::LongUInt(x) => i64::from(*x),
        AMQPValue::LongLongInt(x) => *x,
        _ => return None,
    })
}

/// [`amqp_integer`], also reading a timestamp as its seconds.
fn as_i64(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::Timestamp(x) => Some(*x as i64),
        v => amqp_integer(v),
    }
}

/// The properties of a retried or dead-lettered copy of a delivery from
/// `queue`: the original properties and headers (less the
/// [`BROKER_COUNT_HEADERS`]), plus the failure headers.
/// `x-first-failure` (unix seconds) is kept from an earlier failure. The one
/// property not kept is `expiration` (moved to `x-original-expiration`), so
/// a dead letter never expires out of its `.dlq`.
pub fn failure_properties(
    original: &BasicProperties,
    queue: &str,
    reason: &str,
    retry_count: i64,
    now_secs: i64,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    strip_broker_counts(&mut headers);
    let first = header(original, "x-first-failure")
        .and_then(as_i64)
        .unwrap_or(now_secs);
    let reason: String = reason
        .replace(['\n', '\r'], " ")
        .chars()
        .take(1000)
        .collect();
    headers.insert("x-retry-count".into(), AMQPValue::LongLongInt(retry_count));
    headers.insert(
        "x-original-queue".into(),
        AMQPValue::LongString(LongString::from(queue)),
    );
    headers.insert(
        "x-error".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert("x-first-failure".into(), AMQPValue::LongLongInt(first));
    // A per-message TTL would let the copy expire (and vanish) in the .dlq
    // or leave a delay queue early: it moves to a header, as RabbitMQ's own
    // dead-lettering does (`original-expiration` in x-death).
    match original.expiration() {
        None => original.clone().with_headers(headers),
        Some(exp) => {
            headers.insert(
                "x-original-expiration".into(),
                AMQPValue::LongString(LongString::from(exp.as_str())),
            );
            without_expiration(original).with_headers(headers)
        }
    }
}

/// A copy of `p` with every property but `expiration` (the builder has no
/// way to unset one).
fn without_expiration(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),*) => {
            $(if let Some(v) = p.$get().clone() { out = out.$set(v); })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id
    );
    out
}

/// Properties of an internal message: persistent, with a content type.
pub fn persistent(content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type.into())
}

/// A header table from pairs, for tests and tools.
pub fn headers_of(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_copy_keeps_everything_but_the_broker_counts() {
        let orig = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(42)
            .with_expiration("60000".into())
            .with_headers(headers_of(&[
                ("x-delivery-count", AMQPValue::LongLongInt(1)),
                ("x-retry-count", AMQPValue::LongLongInt(2)),
                ("trace", AMQPValue::LongString("abc".into())),
            ]));
        let p = park_properties(&orig, &[("x-edit-version", AMQPValue::LongLongInt(9))]);
        assert_eq!(delivery_count(&p), 0);
        assert_eq!(retry_count(&p), 2, "delay-tier progress is kept");
        assert_eq!((*p.timestamp(), *p.delivery_mode()), (Some(42), Some(2)));
        assert_eq!(p.expiration().as_ref().map(|e| e.as_str()), Some("60000"));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h.get("x-edit-version"), Some(&AMQPValue::LongLongInt(9)));
        assert_eq!(h.get("trace"), Some(&AMQPValue::LongString("abc".into())));
        let plain = park_properties(&BasicProperties::default(), &[]);
        assert_eq!(delivery_count(&plain), 0);
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
    }

    #[test]
    fn failure_headers_keep_the_original_ones() {
        let orig = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_timestamp(42)
            .with_headers(headers_of(&[
                ("trace", AMQPValue::LongString("abc".into())),
                ("x-first-failure", AMQPValue::LongLongInt(1000)),
                ("x-retry-count", AMQPValue::LongInt(2)),
            ]));
        assert_eq!(retry_count(&orig), 2);
        let p = failure_properties(&orig, "create_messages", "parent\nmissing", 3, 2000);
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.timestamp(), Some(42));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("trace"), Some(&AMQPValue::LongString("abc".into())));
        assert_eq!(h.get("x-retry-count"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(
            h.get("x-first-failure"),
            Some(&AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            h.get("x-error"),
            Some(&AMQPValue::LongString("parent missing".into()))
        );
        assert_eq!(
            h.get("x-original-queue"),
            Some(&AMQPValue::LongString("create_messages".into()))
        );
        let expiring = BasicProperties::default()
            .with_expiration("4000".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_app_id("api".into());
        let p = failure_properties(&expiring, "q", "bad", 0, 7);
        assert_eq!(*p.expiration(), None, "a dead letter must not expire");
        assert_eq!((*p.delivery_mode(), *p.priority()), (Some(2), Some(3)));
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("api"));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-original-expiration"),
            Some(&AMQPValue::LongString("4000".into()))
        );
        let returned = BasicProperties::default().with_headers(headers_of(&[
            ("x-delivery-count", AMQPValue::LongLongInt(2)),
            ("x-acquired-count", AMQPValue::LongLongInt(3)),
            ("trace", AMQPValue::LongString("abc".into())),
        ]));
        assert_eq!(delivery_count(&returned), 2);
        let h = failure_properties(&returned, "q", "bad", 1, 7);
        let h = h.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key("x-delivery-count") && !h.contains_key("x-acquired-count"));
        assert_eq!(h.get("trace"), Some(&AMQPValue::LongString("abc".into())));
        let fresh = failure_properties(&BasicProperties::default(), "q", "bad", 0, 7);
        assert_eq!(retry_count(&fresh), 0);
        let h = fresh.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-first-failure"), Some(&AMQPValue::LongLongInt(7)));
    }
}
