//! The order of edits: which of two edits of one message is the newer.
//!
//! The `update_messages` payload carries no version, and an edit can
//! reach the writer long after a newer one: it waited in a delay tier (its
//! row did not exist yet), a replica without MySQL gave it back, or the
//! broker redelivered it. So every edit gets an *edit version*, an integer
//! in microseconds since the Unix epoch, and the row remembers the version
//! of the edit it holds (`messages.edit_version`): an edit applies only if
//! its version is at least the row's (README, "Edits and their order").
//!
//! Where the version comes from, first match wins:
//! 1. the header [`EDIT_VERSION_HEADER`] (`x-edit-version`), set by a
//!    publisher that knows its edit order, or by a writer on every copy it
//!    republishes (delay tiers, parking, dead letters), so an edit keeps the
//!    version of its first receipt through everything that follows;
//! 2. the time the writer received it, from [`Stamps`] (strictly
//!    increasing within the process, so one consumer's deliveries are
//!    versioned in delivery order), moved into the second of the AMQP
//!    `timestamp` property when the publisher set one: edits published in
//!    different seconds are then ordered by publish time whatever happens
//!    to them later.

use crate::amqp::republish::amqp_integer;
use crate::payload::Malformed;
use crate::time::Micros;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::sync::atomic::{AtomicI64, Ordering};

/// The header holding an edit's version: an AMQP integer, microseconds
/// since the Unix epoch, >= 1.
pub const EDIT_VERSION_HEADER: &str = "x-edit-version";

/// A clock of receive stamps: the current time in microseconds, but
/// always at least one more than the last stamp given, so stamps taken in
/// delivery order are strictly increasing even within one microsecond (a
/// batch of hundreds is stamped at once) and across reconnects.
#[derive(Debug, Default)]
pub struct Stamps {
    last: AtomicI64,
}

/// The process's receive stamps (every consumer, every connection).
pub static STAMPS: Stamps = Stamps::new();

impl Stamps {
    /// A new clock.
    pub const fn new() -> Stamps {
        Stamps {
            last: AtomicI64::new(0),
        }
    }

    /// The next stamp: `max(now, last + 1)`.
    pub fn next(&self, now: Micros) -> Micros {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let stamp = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return stamp,
                Err(seen) => last = seen,
            }
        }
    }
}

/// The edit version of a delivery with `properties`, received at `stamp`
/// (from [`Stamps::next`]).
///
/// Returns the [`EDIT_VERSION_HEADER`] value when present; else `stamp`,
/// clamped into `[ts, ts + 999_999]` µs when the AMQP `timestamp` `ts`
/// (seconds) is set and within MySQL's DATETIME range (as for
/// `created_at`).
///
/// Errors: a header that is not an integer >= 1 ([`Malformed`], naming
/// the header): the delivery is dead-lettered.
pub fn edit_version(properties: &BasicProperties, stamp: Micros) -> Result<Micros, Malformed> {
    if let Some(v) = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(EDIT_VERSION_HEADER))
    {
        return match amqp_integer(v) {
            Some(n) if n >= 1 => Ok(n),
            Some(n) => Err(Malformed(format!(
                "header `{EDIT_VERSION_HEADER}` is {n}, must be >= 1 (microseconds since the Unix epoch)"
            ))),
            None => Err(Malformed(format!(
                "header `{EDIT_VERSION_HEADER}` must be an integer >= 1 (microseconds since the Unix epoch), is {}",
                kind(v)
            ))),
        };
    }
    Ok(clamp_to_second(stamp, *properties.timestamp()))
}

/// `stamp` moved into the second `timestamp` (seconds) when that second is
/// within MySQL's DATETIME range; else `stamp`.
pub fn clamp_to_second(stamp: Micros, timestamp: Option<u64>) -> Micros {
    // The same range as `time::created_at`: years 1000..9999.
    const MIN: i64 = -30_610_224_000;
    const MAX: i64 = 253_402_300_799;
    match timestamp {
        Some(s) if (s as i128) <= MAX as i128 && (s as i64) >= MIN => {
            let start = s as i64 * 1_000_000;
            stamp.clamp(start, start + 999_999)
        }
        _ => stamp,
    }
}

/// The AMQP type of a header value, for error messages.
fn kind(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "a string",
        AMQPValue::Boolean(_) => "a boolean",
        AMQPValue::Float(_) | AMQPValue::Double(_) | AMQPValue::DecimalValue(_) => {
            "a non-integer number"
        }
        AMQPValue::Timestamp(_) => "a timestamp (seconds)",
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::FieldTable(_) => "a table",
        AMQPValue::ByteArray(_) => "a byte array",
        AMQPValue::Void => "void",
        _ => "not an integer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::republish::headers_of;

    const T: u64 = 1_795_953_600; // 2026-11-29T12:00:00Z

    #[test]
    fn stamps_strictly_increase() {
        let s = Stamps::new();
        assert_eq!(s.next(100), 100);
        assert_eq!(s.next(100), 101);
        assert_eq!(s.next(100), 102);
        assert_eq!(s.next(90), 103, "a clock step back never repeats a stamp");
        assert_eq!(s.next(500), 500);
    }

    #[test]
    fn the_header_wins_and_is_checked() {
        let with = |v: AMQPValue| {
            BasicProperties::default()
                .with_timestamp(T)
                .with_headers(headers_of(&[(EDIT_VERSION_HEADER, v)]))
        };
        assert_eq!(
            edit_version(&with(AMQPValue::LongLongInt(42)), 7),
            Ok(42),
            "used as is, not clamped"
        );
        assert_eq!(edit_version(&with(AMQPValue::LongInt(5)), 7), Ok(5));
        assert_eq!(edit_version(&with(AMQPValue::ShortShortUInt(1)), 7), Ok(1));
        let e = edit_version(&with(AMQPValue::LongLongInt(0)), 7).unwrap_err();
        assert_eq!(
            e.0,
            "header `x-edit-version` is 0, must be >= 1 (microseconds since the Unix epoch)"
        );
        let e = edit_version(&with(AMQPValue::LongString("12".into())), 7).unwrap_err();
        assert_eq!(
            e.0,
            "header `x-edit-version` must be an integer >= 1 (microseconds since the Unix epoch), is a string"
        );
        let e = edit_version(&with(AMQPValue::Timestamp(T)), 7).unwrap_err();
        assert!(e.0.ends_with("is a timestamp (seconds)"), "{}", e.0);
    }

    #[test]
    fn a_stamp_is_moved_into_the_publish_second() {
        let base = T as i64 * 1_000_000;
        let props = BasicProperties::default().with_timestamp(T);
        // Received within its second: the stamp as it is.
        assert_eq!(edit_version(&props, base + 250_000), Ok(base + 250_000));
        // Received (or redelivered) long after: the end of its second.
        assert_eq!(edit_version(&props, base + 90_000_000), Ok(base + 999_999));
        // A writer clock behind the publisher's: the start of its second.
        assert_eq!(edit_version(&props, base - 3_000), Ok(base));
        // No timestamp, or one out of range: the stamp.
        assert_eq!(edit_version(&BasicProperties::default(), 77), Ok(77));
        assert_eq!(clamp_to_second(77, Some(u64::MAX)), 77);
        // Two edits published a second apart keep their order, however late
        // the first one is received.
        let a = clamp_to_second(base + 3_600_000_000, Some(T));
        let b = clamp_to_second(base + 1_000_010, Some(T + 1));
        assert!(a < b, "{a} < {b}");
    }
}
